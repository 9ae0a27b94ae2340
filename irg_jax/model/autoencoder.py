"""The FLUX autoencoder (frozen VAE) and a parameter-free identity stand-in, NHWC throughout.

FLUX AE: ResNet blocks with GroupNorm(32, eps 1e-6) and swish, one single-head
attention block in the middle, ``len(ch_mult) - 1`` resolution changes. Downsample
pads right/bottom by one and applies a 3x3 stride-2 conv; upsample is nearest x2 and a
3x3 conv. The encoder emits 2*z channels (mean, logvar); ``encode`` samples the
posterior and returns ``scale * (z - shift)``; ``decode`` inverts that scaling.
Parameter names mirror the FLUX state dict (see :mod:`irg_jax.convert.ae_keys`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from irg_jax.model.embeddings import depth_to_space, space_to_depth
from irg_jax.parallel.sharding import param

_NORM_GROUPS = 32
_NORM_EPS = 1e-6
_ATTN_QUERY_CHUNK = 4096


class Conv2d(nnx.Module):
    """NHWC convolution; kernel (kh, kw, in, out), computed in the input dtype."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, rngs: nnx.Rngs, *, stride: int = 1,
                 padding=None):
        k = kernel_size
        init = nnx.initializers.lecun_normal()
        self.kernel = param(init(rngs.params(), (k, k, in_ch, out_ch), jnp.float32),
                            (None, None, "conv_in", "conv_out"))
        self.bias = param(jnp.zeros((out_ch,), jnp.float32), ("conv_out",))
        self.stride = stride
        self.padding = padding if padding is not None else ((k // 2, k // 2), (k // 2, k // 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x, self.kernel[...].astype(x.dtype), (self.stride, self.stride), self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...].astype(x.dtype)


class GroupNorm(nnx.Module):
    """GroupNorm(32 groups, eps 1e-6) over NHWC with per-channel scale and bias; stats in float32."""

    def __init__(self, channels: int):
        if channels % _NORM_GROUPS:
            raise ValueError(f"GroupNorm needs channels divisible by {_NORM_GROUPS}, got {channels}")
        self.scale = param(jnp.ones((channels,), jnp.float32), ("norm",))
        self.bias = param(jnp.zeros((channels,), jnp.float32), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        g = x.astype(jnp.float32).reshape(n, h, w, _NORM_GROUPS, c // _NORM_GROUPS)
        mean = g.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
        g = ((g - mean) * jax.lax.rsqrt(var + _NORM_EPS)).reshape(n, h, w, c)
        return (g * self.scale[...] + self.bias[...]).astype(x.dtype)


class ResnetBlock(nnx.Module):
    """x' = shortcut(x) + conv2(swish(norm2(conv1(swish(norm1(x)))))); 1x1 shortcut if widths differ."""

    def __init__(self, in_ch: int, out_ch: int, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(in_ch)
        self.conv1 = Conv2d(in_ch, out_ch, 3, rngs)
        self.norm2 = GroupNorm(out_ch)
        self.conv2 = Conv2d(out_ch, out_ch, 3, rngs)
        self.nin_shortcut = Conv2d(in_ch, out_ch, 1, rngs) if in_ch != out_ch else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.swish(self.norm1(x)))
        h = self.conv2(jax.nn.swish(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


def single_head_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          query_chunk: int = _ATTN_QUERY_CHUNK) -> jax.Array:
    """softmax(q k^T / sqrt(C)) v for [N, T, C] inputs; queries in chunks of ``query_chunk`` bound memory."""
    def dense(qc):
        s = jnp.einsum("nqc,nkc->nqk", qc, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
        return jnp.einsum("nqk,nkc->nqc", jax.nn.softmax(s, axis=-1).astype(v.dtype), v)

    n, t, c = q.shape
    if t <= query_chunk:
        return dense(q)
    pad = -t % query_chunk
    chunks = jnp.pad(q, ((0, 0), (0, pad), (0, 0))).reshape(n, -1, query_chunk, c).swapaxes(0, 1)
    out = jax.lax.map(dense, chunks).swapaxes(0, 1).reshape(n, t + pad, c)
    return out[:, :t]


class AttnBlock(nnx.Module):
    """Single-head self-attention over all pixels, 1x1-conv projections, residual."""

    def __init__(self, ch: int, rngs: nnx.Rngs):
        self.norm = GroupNorm(ch)
        self.q = Conv2d(ch, ch, 1, rngs)
        self.k = Conv2d(ch, ch, 1, rngs)
        self.v = Conv2d(ch, ch, 1, rngs)
        self.proj_out = Conv2d(ch, ch, 1, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        y = self.norm(x)
        flat = lambda t: t.reshape(n, h * w, c)
        out = single_head_attention(flat(self.q(y)), flat(self.k(y)), flat(self.v(y)))
        return x + self.proj_out(out.reshape(n, h, w, c))


class Downsample(nnx.Module):
    def __init__(self, ch: int, rngs: nnx.Rngs):
        self.conv = Conv2d(ch, ch, 3, rngs, stride=2, padding=((0, 1), (0, 1)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    def __init__(self, ch: int, rngs: nnx.Rngs):
        self.conv = Conv2d(ch, ch, 3, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class MidBlock(nnx.Module):
    def __init__(self, ch: int, rngs: nnx.Rngs):
        self.block_1 = ResnetBlock(ch, ch, rngs)
        self.attn_1 = AttnBlock(ch, rngs)
        self.block_2 = ResnetBlock(ch, ch, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nnx.Module):
    """One resolution: ResNet blocks, then the encoder's downsample or the decoder's upsample (if any)."""

    def __init__(self, widths: list[tuple[int, int]], rngs: nnx.Rngs, *, downsample: Downsample | None = None,
                 upsample: Upsample | None = None):
        self.block = nnx.List([ResnetBlock(i, o, rngs) for i, o in widths])
        self.downsample = downsample
        self.upsample = upsample

    def __call__(self, x: jax.Array) -> jax.Array:
        for blk in self.block:
            x = blk(x)
        for resample in (self.downsample, self.upsample):
            if resample is not None:
                x = resample(x)
        return x


class Encoder(nnx.Module):
    def __init__(self, ae_cfg, rngs: nnx.Rngs):
        ch, mult, nres = ae_cfg.ch, list(ae_cfg.ch_mult), ae_cfg.num_res_blocks
        self.conv_in = Conv2d(ae_cfg.in_channels, ch, 3, rngs)
        levels = []
        block_in = ch
        for i, m in enumerate(mult):
            widths = [(block_in if b == 0 else ch * m, ch * m) for b in range(nres)]
            block_in = ch * m
            down = Downsample(block_in, rngs) if i != len(mult) - 1 else None
            levels.append(Level(widths, rngs, downsample=down))
        self.down = nnx.List(levels)
        self.mid = MidBlock(block_in, rngs)
        self.norm_out = GroupNorm(block_in)
        self.conv_out = Conv2d(block_in, 2 * ae_cfg.z_channels, 3, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(jax.nn.swish(self.norm_out(h)))


class Decoder(nnx.Module):
    """``up[i]`` is resolution level i; the lowest resolution (last level) is applied first."""

    def __init__(self, ae_cfg, rngs: nnx.Rngs):
        ch, mult, nres = ae_cfg.ch, list(ae_cfg.ch_mult), ae_cfg.num_res_blocks
        block_in = ch * mult[-1]
        self.conv_in = Conv2d(ae_cfg.z_channels, block_in, 3, rngs)
        self.mid = MidBlock(block_in, rngs)
        levels: list[Level] = []
        for i in reversed(range(len(mult))):
            widths = [(block_in if b == 0 else ch * mult[i], ch * mult[i]) for b in range(nres + 1)]
            block_in = ch * mult[i]
            up = Upsample(block_in, rngs) if i != 0 else None
            levels.insert(0, Level(widths, rngs, upsample=up))
        self.up = nnx.List(levels)
        self.norm_out = GroupNorm(block_in)
        self.conv_out = Conv2d(block_in, ae_cfg.out_ch, 3, rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(jax.nn.swish(self.norm_out(h)))


def posterior_eps(noise, shape) -> jax.Array:
    """A PRNG key -> N(0, 1) of ``shape``; an array -> checked and returned as float32."""
    noise = jnp.asarray(noise)
    is_key = jax.dtypes.issubdtype(noise.dtype, jax.dtypes.prng_key) or (
        noise.dtype == jnp.uint32 and noise.shape == (2,))
    if is_key:
        return jax.random.normal(noise, shape, jnp.float32)
    if noise.shape != shape:
        raise ValueError(f"posterior noise has shape {noise.shape}, the latent is {shape}")
    return noise.astype(jnp.float32)


class FluxAutoEncoder(nnx.Module):
    """FLUX AE with BAGEL's latent scaling. Images NHWC in [-1, 1]; latents NHWC [N, H/d, W/d, z]."""

    def __init__(self, ae_cfg, rngs: nnx.Rngs, dtype=jnp.float32):
        levels = len(ae_cfg.ch_mult) - 1
        if 2 ** levels != ae_cfg.downsample:
            raise ValueError(f"ch_mult {list(ae_cfg.ch_mult)} gives downsample {2 ** levels}, "
                             f"config says {ae_cfg.downsample}")
        self.encoder = Encoder(ae_cfg, rngs)
        self.decoder = Decoder(ae_cfg, rngs)
        self.downsample = ae_cfg.downsample
        self.z_channels = ae_cfg.z_channels
        self.scale_factor = float(ae_cfg.scale_factor)
        self.shift_factor = float(ae_cfg.shift_factor)
        self.dtype = jnp.dtype(dtype)

    def posterior(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Encoder output split into (mean, logvar), float32, each [N, H/d, W/d, z]."""
        n, h, w, _ = images.shape
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"image size {h}x{w} is not a multiple of the AE downsample {self.downsample}")
        moments = self.encoder(images.astype(self.dtype)).astype(jnp.float32)
        return moments[..., :self.z_channels], moments[..., self.z_channels:]

    def encode(self, images: jax.Array, noise=None, *, sample: bool = True) -> jax.Array:
        """Scaled latent ``scale * (mean + exp(logvar/2) * eps - shift)``, float32.

        ``noise`` is a PRNG key or the eps array itself (shape of the latent). The
        official encoder always samples; ``sample=False`` uses the posterior mean.
        """
        mean, logvar = self.posterior(images)
        if sample:
            if noise is None:
                raise ValueError("FluxAutoEncoder.encode samples the posterior: pass a PRNG key or eps "
                                 "as `noise` (or sample=False for the mean)")
            z = mean + jnp.exp(0.5 * logvar) * posterior_eps(noise, mean.shape)
        else:
            z = mean
        return self.scale_factor * (z - self.shift_factor)

    def decode(self, z: jax.Array) -> jax.Array:
        """Scaled latent -> images NHWC in about [-1, 1] (unclamped), float32."""
        z = z.astype(jnp.float32) / self.scale_factor + self.shift_factor
        return self.decoder(z.astype(self.dtype)).astype(jnp.float32)


class IdentityAutoEncoder(nnx.Module):
    """No parameters: the latent is a pixel space-to-depth by ``downsample`` (z = 3*d*d channels).

    The latent vector of one cell is ordered (dy, dx, c); scale 1, shift 0.
    """

    def __init__(self, downsample: int):
        self.downsample = downsample
        self.z_channels = 3 * downsample ** 2
        self.scale_factor = 1.0
        self.shift_factor = 0.0

    def encode(self, images: jax.Array, noise=None, *, sample: bool = True) -> jax.Array:
        del noise, sample  # deterministic: there is no posterior
        return space_to_depth(images.astype(jnp.float32), self.downsample)

    def decode(self, z: jax.Array) -> jax.Array:
        return depth_to_space(z.astype(jnp.float32), self.downsample, 3)


def build_autoencoder(ae_cfg, rngs: nnx.Rngs) -> FluxAutoEncoder | IdentityAutoEncoder:
    """The autoencoder named by ``ae_cfg.kind`` ('flux' or 'identity'), randomly initialised."""
    if ae_cfg.kind == "flux":
        return FluxAutoEncoder(ae_cfg, rngs, dtype=ae_cfg.get("dtype", "float32"))
    if ae_cfg.kind == "identity":
        if ae_cfg.get("z_channels") not in (None, 3 * ae_cfg.downsample ** 2):
            raise ValueError(f"identity autoencoder with downsample {ae_cfg.downsample} has "
                             f"z_channels {3 * ae_cfg.downsample ** 2}, config says {ae_cfg.z_channels}")
        return IdentityAutoEncoder(ae_cfg.downsample)
    raise ValueError(f"unknown autoencoder kind {ae_cfg.kind!r} (expected 'flux' or 'identity')")
