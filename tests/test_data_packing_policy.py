"""The packing policy on the demo and the 7B configs' settings: nothing drawn is lost, the buffer
drains first-in-first-out within ``max_wait`` packs, and the mixture weights hold.

Samples are stand-ins with each IRGL mode's plan and realistic lengths (no pixels are built:
``UsageOnlyBuilder`` makes the same packing decisions without the arrays)."""
import collections

import numpy as np
import pytest

from irg_jax.config.irgl import irgl_config
from irg_jax.data.config import budgets_from_config, policy_from_config, rules_from_config
from irg_jax.data.irg_format import TEXT, VAE_IMAGE, VIT_IMAGE, PlanItem, Sample, SkipCounter
from irg_jax.data.mixture import groups_from_config, stage1_groups
from irg_jax.data.pack_policy import GroupChoice, PackAssembler, UsageOnlyBuilder
from irg_jax.data.packing import NumpyPackRandom

# Per mode, after the system prompt and the user prompt: ("text", name, loss) or
# ("image", name, need_loss, need_vae, need_vit), as the synthetic world writes them.
MODE_PARTS = {
    "initial_thinking_understanding_learning": [("text", "think1", True)],
    "initial_thinking_generation_learning": [("text", "think1", False), ("image", "image1", True, False, False)],
    "initial_full_learning": [("text", "think1", True), ("image", "image1", True, False, False)],
    "improving_thinking_understanding_learning": [("text", "think1", False), ("image", "image1", False, True, True),
                                                  ("text", "think2", True)],
    "improving_thinking_generation_learning": [("text", "think1", False), ("image", "image1", False, True, True),
                                               ("text", "think2", False), ("image", "image2", True, False, False)],
    "improving_full_learning": [("text", "think1", True), ("image", "image1", False, True, True),
                                ("text", "think2", True), ("image", "image2", True, False, False)],
}


class Ids:
    bos_id, eos_id, start_of_image_id, end_of_image_id = 1, 2, 3, 4


def pixels(h, w):
    return np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (h, w, 3))


def make_sampler(groups, text_lens, vae_sides, vit_sides):
    """sample(g, i): a deterministic stand-in row of group ``g``'s mode."""
    def sample(g, i):
        rng = np.random.default_rng([g, i])
        plan, texts, images = [PlanItem(TEXT, False, True)] * 2, [text_lens["system"], rng.integers(*text_lens["prompt"])], []
        vae = (int(rng.choice(vae_sides)), int(rng.choice(vae_sides)))
        vit = (int(rng.choice(vit_sides)), int(rng.choice(vit_sides)))
        for kind, name, *flags in MODE_PARTS[groups[g].name]:
            if kind == "text":
                plan.append(PlanItem(TEXT, flags[0], True))
                texts.append(rng.integers(*text_lens[name]))
                continue
            loss, clean, vit_copy = flags
            for on, item, hw in ((loss, PlanItem(VAE_IMAGE, True, False), vae),
                                 (clean, PlanItem(VAE_IMAGE, False, True), vae),
                                 (vit_copy, PlanItem(VIT_IMAGE, False, True), vit)):
                if on:
                    plan.append(item)
                    images.append(pixels(*hw))
        return Sample(tuple(plan), tuple(tuple(range(int(n))) for n in texts), tuple(images), f"{groups[g].name}/{i}")
    return sample


def simulate(config_arg, text_lens, vae_sides, vit_sides, num_packs, seed=0, stage=1):
    """Packs ``num_packs`` packs of one batch row, then ``max_wait`` more; returns what was seen.

    The config's budgets and policy with IRG's stage-1 mixture (four mandatory groups, all six
    modes): the demo's own stage 1 draws the two initial generation modes only, which would leave
    the mixture untested, and its packs are shaped for them (448 text + 640 image tokens), so the
    demo is run with its stage-2 budgets (640 + 448)."""
    data, irg = irgl_config(stage, config_arg).data, stage1_groups()
    for name in MODE_PARTS:
        data.groups[name].paths = ("unused",)
        data.groups[name].is_mandatory, data.groups[name].weight = irg[name].is_mandatory, irg[name].weight
    groups = [GroupChoice(g.name, g.is_mandatory, g.weight) for g in groups_from_config(data.groups)]
    policy = policy_from_config(data)
    asm = PackAssembler(groups, policy, rules_from_config(data, Ids), budgets_from_config(data)[-1], SkipCounter(),
                        builder_factory=UsageOnlyBuilder)
    sample = make_sampler(groups, text_lens, vae_sides, vit_sides)
    cursors, drawn_at, packed_at, pack = [0] * len(groups), {}, {}, [0]

    def draw(g):
        i = cursors[g]
        cursors[g] += 1
        drawn_at[(g, i)] = pack[0]
        return i, sample(g, i)

    rand = NumpyPackRandom(np.random.default_rng(seed))
    totals, longest_buffer = collections.Counter(), 0
    for k in range(num_packs + asm.max_wait):
        pack[0] = k
        res = asm.next_pack(draw, rand)
        for m in res.members:
            assert m not in packed_at, f"{m} packed twice"
            packed_at[m] = k
        longest_buffer = max(longest_buffer, len(asm.buffer))
        if k < num_packs:
            totals.update(res.stats)
    return dict(groups=groups, policy=policy, asm=asm, drawn_at=drawn_at, packed_at=packed_at, totals=totals,
                longest_buffer=longest_buffer, num_mandatory=sum(g.is_mandatory for g in groups))


def check_nothing_lost(run, num_packs):
    drawn_at, packed_at, asm = run["drawn_at"], run["packed_at"], run["asm"]
    assert set(packed_at) <= set(drawn_at)  # nothing packed that was not drawn
    early = [m for m, k in drawn_at.items() if k < num_packs]
    missing = [m for m in early if m not in packed_at]
    assert not missing, f"{len(missing)} of {len(early)} samples drawn in the first {num_packs} packs never packed"
    waits = [packed_at[m] - drawn_at[m] for m in early]
    assert 0 <= min(waits) and max(waits) <= asm.max_wait
    assert run["longest_buffer"] <= run["policy"].max_buffer_size + run["num_mandatory"]
    t = run["totals"]
    assert t["drawn"] == sum(1 for k in drawn_at.values() if k < num_packs)
    return max(waits)


def weighted_shares(run, num_packs):
    """Share of each group among the weight-proportional draws (mandatory draws taken out)."""
    t, out = run["totals"], {}
    for g in run["groups"]:
        mandatory = (num_packs - t["mandatory_postponed"]) if g.is_mandatory else 0
        out[g.name] = t[f"drawn/{g.name}"] - mandatory
    total = sum(out.values())
    weights = {g.name: g.weight / sum(x.weight for x in run["groups"]) for g in run["groups"]}
    return {k: v / total for k, v in out.items()}, weights, total


# The demo world's lengths (WordTokenizer ids; 32 px images: 8x8 latents at stride 4, 4x4 ViT patches at 8).
DEMO = dict(text_lens={"system": 25, "prompt": (4, 12), "think1": (20, 36), "think2": (70, 100)},
            vae_sides=(32,), vit_sides=(32,))
# IRG-like lengths at the 7B settings: 512-1024 px VAE images (stride 16), 378-980 px ViT images (patch 14).
SEVEN_B = dict(text_lens={"system": 150, "prompt": (20, 80), "think1": (100, 400), "think2": (200, 800)},
               vae_sides=(512, 768, 1024), vit_sides=(378, 672, 980))


@pytest.mark.parametrize("arg,lens,num_packs,stage", [("demo", DEMO, 800, 2), ("bagel_7b_mot", SEVEN_B, 400, 1)])
def test_nothing_lost_fifo_and_mixture(arg, lens, num_packs, stage):
    run = simulate(arg, num_packs=num_packs, stage=stage, **lens)
    # every sample drawn in the first num_packs packs is packed, once, within max_wait packs
    worst = check_nothing_lost(run, num_packs)
    assert run["totals"]["drawn"] > 4 * num_packs  # the four mandatory groups and more
    # the weight-proportional draws follow the weights (mandatory draws taken out) ...
    shares, weights, n = weighted_shares(run, num_packs)
    for name, w in weights.items():
        sd = (w * (1 - w) / n) ** 0.5
        assert abs(shares[name] - w) < 4 * sd, (name, shares[name], w, n)
    # ... and, nothing being lost, so do the packed samples: the non-mandatory groups get their share
    for g, group in enumerate(run["groups"]):
        drawn = [m for m, k in run["drawn_at"].items() if m[0] == g and k < num_packs]
        if not group.is_mandatory:
            assert len(drawn) > 0.5 * weights[group.name] * n
    print(f"{arg}: worst wait {worst} packs (bound {run['asm'].max_wait}), longest buffer {run['longest_buffer']}, "
          f"{run['totals']['drawn']} drawn in {num_packs} packs, weighted shares "
          + ", ".join(f"{k}: {shares[k]:.3f} (weight {weights[k]:.3f})" for k in weights))
