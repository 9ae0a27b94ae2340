"""Which samples go into which pack: IRG's ``PackedDataset.__iter__`` policy (spec §4.3),
with an overflow buffer that never loses a sample.

Per pack:
  0. if the oldest buffered sample was passed over by the previous pack (it did not fit), it
     opens this pack (it always fits an empty one);
  1. one sample from every mandatory group, in group order (a mandatory sample that does not
     fit the static budgets goes to the back of the buffer); while deferred mandatory samples
     hold the buffer above ``max_buffer_size``, these draws wait (``mandatory_postponed``);
  2. the buffer, oldest first: every buffered sample that fits is packed (first fit; an
     unfit one keeps its place), until the pack holds ``expected_num_tokens``;
  3. fresh samples while the pack is short of ``expected_num_tokens`` and the buffer has room
     (fewer than ``max_buffer_size`` samples): a group drawn with probability proportional to
     its weight (one ``uniform()`` draw; first group whose cumulative probability exceeds it);
     a sample that fits is packed, one that does not goes to the back of the buffer;
  4. the pack is emitted.
A sample whose length estimate exceeds ``max_num_tokens_per_sample`` (or that could not fit even
an empty pack's static budgets) is skipped and counted when drawn (``over_sample_budget``).

Guarantees (tests/test_data_packing_policy.py):
  - no drawn sample is ever dropped: each one is packed at once or buffered;
  - the buffer drains first-in-first-out: each pack removes at least its oldest entry, or
    the next pack opens with it, so a sample that enters the buffer at position ``p`` is packed
    within ``p + 2`` packs, and the buffer never holds more than ``max_buffer_size`` plus the
    number of mandatory groups (:meth:`PackAssembler.max_wait`);
  - the mixture holds: which group is drawn depends only on the weights, never on what fits,
    and every draw is packed, so the packed shares follow the drawn shares. When the buffer is
    full no fresh sample is drawn (back-pressure) instead of one being discarded, and while
    it is over-full a pack also skips its mandatory draws (``mandatory_postponed``).

Differences from the official loop, all deliberate:
  - IRG drops the sample that triggers an emission (an unfit buffered one, or a fresh one when
    the buffer is full) and serves the buffer only while the pack is shorter than
    ``prefer_buffer_before`` and only from its head, so packs whose mandatory samples pass
    that length never read it again. Here the buffer is served in every pack, first fit,
    before fresh draws; ``prefer_buffer_before`` is accepted (IRG configs set it) but no
    longer changes the packing;
  - IRG keeps drawing after the mandatory samples even when they already reach
    ``expected_num_tokens`` (each draw overflows into the buffer until it is full); here such
    a pack is emitted at once;
  - the static budgets (``und_len``, ``gen_len``, ``vit_len``, ``ce_len``, ``num_vae_images``)
    are hard limits, for mandatory samples too (IRG only skips ``max_num_tokens`` for them);
  - a group that yields nothing usable for ``max_consecutive_skips`` draws raises.
As in IRG, mandatory samples do not check the soft ``max_num_tokens`` limit, so a pack can
exceed it (never the static budgets).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Sequence

from irg_jax.data import packed_batch as pb
from irg_jax.data.irg_format import Sample, SkipCounter, Skipped
from irg_jax.data.packing import LogicalPack, PackBuilder, PackingRules, PackRandom, Usage, fits, sample_usage


@dataclasses.dataclass(frozen=True)
class PackingPolicy:
    expected_num_tokens: int
    max_num_tokens: int
    max_num_tokens_per_sample: int
    prefer_buffer_before: int   # IRG's setting; accepted, no longer used (see the module docstring)
    max_buffer_size: int = 50
    max_consecutive_skips: int = 10_000


@dataclasses.dataclass(frozen=True)
class GroupChoice:
    name: str
    is_mandatory: bool
    weight: float


@dataclasses.dataclass
class Candidate:
    group: int
    index: int           # position in the group's (per-process) sample stream
    sample: Sample
    usage: Usage
    length: int          # IRG's length estimate (no dropout)
    drawn_at: int = 0    # the pack (of this assembler) during which it was drawn


# draw(group) -> (index in that group's stream, the element at it)
Draw = Callable[[int], "tuple[int, Sample | Skipped]"]


@dataclasses.dataclass
class PackResult:
    pack: LogicalPack | None         # None with a usage-only builder
    members: list[tuple[int, int]]   # (group, index) of every packed sample, in pack order
    stats: dict[str, int]


class UsageOnlyBuilder:
    """Stands in for :class:`PackBuilder` where only the packing decisions matter (simulations of
    large configs): tracks tokens and budget use, builds no arrays; ``finish()`` returns None."""

    def __init__(self, rules: PackingRules | None = None):
        del rules
        self.n, self.usage, self.num_samples = 0, Usage(), 0

    def add(self, sample: Sample, rand: PackRandom, usage: Usage) -> None:
        del sample, rand
        self.n += usage.tokens
        self.usage = self.usage + usage
        self.num_samples += 1

    def finish(self) -> None:
        return None


class PackAssembler:
    """Builds packs from group streams; its state is the overflow buffer (and a pack count)."""

    def __init__(self, groups: Sequence[GroupChoice], policy: PackingPolicy, rules: PackingRules,
                 budgets: pb.PackBudgets, counter: SkipCounter, builder_factory=PackBuilder):
        total = sum(g.weight for g in groups)
        if total <= 0:
            raise ValueError("the group weights must sum to a positive number")
        if policy.max_buffer_size < 1:
            raise ValueError(f"max_buffer_size must be >= 1, got {policy.max_buffer_size}")
        self.groups, self.policy, self.rules, self.budgets = list(groups), policy, rules, budgets
        self.counter, self._builder_factory = counter, builder_factory
        acc, self._cumprobs = 0.0, []
        for g in groups:
            acc += g.weight
            self._cumprobs.append(acc / total)
        self.buffer: list[Candidate] = []
        self.head_due = False   # the oldest buffered sample opens the next pack
        self.num_packs = 0

    @property
    def max_wait(self) -> int:
        """Most packs a sample can spend in the buffer: it enters at position
        < ``max_buffer_size`` + number of mandatory groups and every pack after the first removes
        the oldest entry."""
        return self.policy.max_buffer_size + sum(g.is_mandatory for g in self.groups) + 1

    # ------------------------------------------------------------------ helpers
    def choose_group(self, u: float) -> int:
        for i, c in enumerate(self._cumprobs):
            if u < c:
                return i
        return 0

    def _draw(self, draw: Draw, group: int) -> Candidate:
        """Next usable sample of ``group``; bad rows and over-budget samples are counted."""
        for _ in range(self.policy.max_consecutive_skips):
            index, element = draw(group)
            if isinstance(element, Skipped):
                self.counter.skip(element.reason, element.source, element.detail)
                continue
            details = element.note_details or ("",) * len(element.notes)
            for note, detail in zip(element.notes, details):
                self.counter.note(note, element.source, detail)
            usage = sample_usage(element, self.rules)
            length = usage.tokens
            too_long = length > self.policy.max_num_tokens_per_sample
            bad = fits(usage, self.budgets, self.budgets.vae_image_size)
            if too_long or bad:
                why = (f"{length} tokens > max_num_tokens_per_sample {self.policy.max_num_tokens_per_sample}"
                       if too_long else f"exceeds budget {bad} even in an empty pack")
                self.counter.skip("over_sample_budget", element.source, why, bad_input=False)
                continue
            return Candidate(group, index, element, usage, length, self.num_packs)
        top = ", ".join(f"{k}: {v}" for k, v in self.counter.skipped.most_common(3))
        raise RuntimeError(f"group {self.groups[group].name!r} produced no usable sample in "
                           f"{self.policy.max_consecutive_skips} consecutive draws (skips so far: {top})")

    def _fits(self, builder, c: Candidate, soft: bool = True) -> bool:
        if soft and builder.n + c.length > self.policy.max_num_tokens:
            return False
        return fits(builder.usage + c.usage, self.budgets, self.budgets.vae_image_size) is None

    # ------------------------------------------------------------------ main loop
    def next_pack(self, draw: Draw, rand: PackRandom) -> PackResult:
        p = self.policy
        builder = self._builder_factory(self.rules)
        members: list[tuple[int, int]] = []
        stats: collections.Counter = collections.Counter()

        def add(c: Candidate) -> None:
            builder.add(c.sample, rand, c.usage)
            members.append((c.group, c.index))
            stats[f"packed/{self.groups[c.group].name}"] += 1
            stats["max_wait"] = max(stats["max_wait"], self.num_packs - c.drawn_at)

        def fresh(g: int) -> Candidate:
            c = self._draw(draw, g)
            stats["drawn"] += 1
            stats[f"drawn/{self.groups[g].name}"] += 1
            return c

        def full() -> bool:
            return builder.n >= p.expected_num_tokens

        # 0. the oldest buffered sample, passed over by the previous pack, opens this one
        if self.head_due and self.buffer:
            add(self.buffer.pop(0))
            stats["from_buffer"] += 1
        self.head_due = False
        # 1. one sample of every mandatory group, unless the buffer is over-full
        postpone = len(self.buffer) > p.max_buffer_size
        stats["mandatory_postponed"] += postpone
        for g, group in enumerate(self.groups):
            if group.is_mandatory and not postpone:
                c = fresh(g)
                if self._fits(builder, c, soft=False):
                    add(c)
                else:
                    self.buffer.append(c)
                    stats["buffered"] += 1
                    stats["mandatory_deferred"] += 1
        # 2. the buffer, oldest first, first fit
        head = self.buffer[0] if self.buffer else None
        kept: list[Candidate] = []
        for c in self.buffer:
            if not full() and self._fits(builder, c):
                add(c)
                stats["from_buffer"] += 1
            else:
                kept.append(c)
        self.buffer = kept
        # 3. fresh weighted draws while the pack is short and the buffer has room
        while not full() and len(self.buffer) < p.max_buffer_size:
            c = fresh(self.choose_group(rand.uniform()))
            if self._fits(builder, c):
                add(c)
            else:
                self.buffer.append(c)
                stats["buffered"] += 1
        self.head_due = head is not None and bool(self.buffer) and self.buffer[0] is head
        if builder.num_samples == 0:  # cannot happen: an empty pack takes any buffered or fresh sample
            raise RuntimeError("packing produced an empty pack")
        self.num_packs += 1
        stats.update(samples=builder.num_samples, packed=builder.num_samples, tokens=builder.n, buffer_size=len(self.buffer))
        return PackResult(builder.finish(), members, dict(stats))

    # ------------------------------------------------------------------ resume
    def buffer_state(self) -> dict:
        """The buffer as ``(group, index, drawn_at)`` references, oldest first, plus whether its
        head opens the next pack and the number of packs built."""
        return {"buffer": [[c.group, c.index, c.drawn_at] for c in self.buffer],
                "head_due": bool(self.head_due), "num_packs": int(self.num_packs)}

    def restore_buffer(self, state: dict, fetch: Callable[[int, int], "Sample | Skipped"]) -> None:
        """Rebuild the buffer from :meth:`buffer_state`; ``fetch(group, index)`` re-reads a sample.
        A state written before the buffer kept its order (``carry``) is read too: the carried
        sample becomes the head that opens the next pack."""
        self.num_packs = int(state.get("num_packs", 0))

        def load(g, i, drawn_at=None) -> Candidate:
            s = fetch(int(g), int(i))
            if isinstance(s, Skipped):
                raise RuntimeError(f"buffered sample {s.source} no longer decodes: {s.reason}")
            u = sample_usage(s, self.rules)
            return Candidate(int(g), int(i), s, u, u.tokens, self.num_packs if drawn_at is None else int(drawn_at))
        self.buffer = [load(*ref) for ref in state["buffer"]]
        self.head_due = bool(state.get("head_due", False))
        if state.get("carry"):
            self.buffer.insert(0, load(*state["carry"]))
            self.head_due = True
