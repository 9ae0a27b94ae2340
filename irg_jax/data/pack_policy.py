"""Which samples go into which pack: IRG's ``PackedDataset.__iter__`` policy (spec §4.3).

Per pack:
  1. one sample from every mandatory group (in group order);
  2. then, while the pack is shorter than ``prefer_buffer_before`` and the overflow buffer
     is not empty, the oldest buffered sample; otherwise a group drawn with probability
     proportional to its weight (one ``uniform()`` draw; first group whose cumulative
     probability exceeds it);
  3. a sample whose length estimate exceeds ``max_num_tokens_per_sample`` (or that could not
     fit even an empty pack's static budgets) is skipped and counted;
  4. a sample that would overflow the pack (``max_num_tokens``, or any static budget) goes to
     the buffer (up to ``max_buffer_size``); if it came from the buffer, or the buffer is
     full, the pack is emitted;
  5. the pack is emitted once it holds ``expected_num_tokens`` tokens.

Differences from the official loop, all deliberate:
  - the static budgets (``und_len``, ``gen_len``, ``vit_len``, ``ce_len``, ``num_vae_images``)
    are hard limits, for mandatory samples too; a mandatory sample that does not fit goes to
    the buffer instead of overrunning the pack (IRG only skips ``max_num_tokens`` for them);
  - the sample that triggers an emission is kept instead of being dropped: back at the
    front of the buffer if it came from there, otherwise it opens the next pack right after
    the mandatory samples (``carry``);
  - a group that yields nothing usable for ``max_consecutive_skips`` draws raises.
As in IRG, mandatory samples do not check the soft ``max_num_tokens`` limit, so a pack
can exceed it (never the static budgets).
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
    prefer_buffer_before: int
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


# draw(group) -> (index in that group's stream, the element at it)
Draw = Callable[[int], "tuple[int, Sample | Skipped]"]


@dataclasses.dataclass
class PackResult:
    pack: LogicalPack
    members: list[tuple[int, int]]   # (group, index) of every packed sample, in pack order
    stats: dict[str, int]


class PackAssembler:
    """Builds packs from group streams; its only state is the overflow buffer."""

    def __init__(self, groups: Sequence[GroupChoice], policy: PackingPolicy, rules: PackingRules,
                 budgets: pb.PackBudgets, counter: SkipCounter):
        total = sum(g.weight for g in groups)
        if total <= 0:
            raise ValueError("the group weights must sum to a positive number")
        self.groups, self.policy, self.rules, self.budgets = list(groups), policy, rules, budgets
        self.counter = counter
        acc, self._cumprobs = 0.0, []
        for g in groups:
            acc += g.weight
            self._cumprobs.append(acc / total)
        self.buffer: list[Candidate] = []
        self.carry: Candidate | None = None

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
            for note in element.notes:
                self.counter.note(note, element.source)
            usage = sample_usage(element, self.rules)
            length = usage.tokens
            too_long = length > self.policy.max_num_tokens_per_sample
            bad = fits(usage, self.budgets, self.budgets.vae_image_size)
            if too_long or bad:
                why = (f"{length} tokens > max_num_tokens_per_sample {self.policy.max_num_tokens_per_sample}"
                       if too_long else f"exceeds budget {bad} even in an empty pack")
                self.counter.skip("over_sample_budget", element.source, why, bad_input=False)
                continue
            return Candidate(group, index, element, usage, length)
        top = ", ".join(f"{k}: {v}" for k, v in self.counter.skipped.most_common(3))
        raise RuntimeError(f"group {self.groups[group].name!r} produced no usable sample in "
                           f"{self.policy.max_consecutive_skips} consecutive draws (skips so far: {top})")

    def _fits(self, builder: PackBuilder, c: Candidate) -> bool:
        return fits(builder.usage + c.usage, self.budgets, self.budgets.vae_image_size) is None

    # ------------------------------------------------------------------ main loop
    def next_pack(self, draw: Draw, rand: PackRandom) -> PackResult:
        p = self.policy
        builder = PackBuilder(self.rules)
        members: list[tuple[int, int]] = []
        stats: collections.Counter = collections.Counter()

        def add(c: Candidate) -> None:
            builder.add(c.sample, rand, c.usage)
            members.append((c.group, c.index))

        for g, group in enumerate(self.groups):
            if group.is_mandatory:
                c = self._draw(draw, g)
                if self._fits(builder, c):
                    add(c)
                else:
                    self.buffer.append(c)
                    stats["mandatory_deferred"] += 1
        if self.carry is not None:
            c, self.carry = self.carry, None
            if self._fits(builder, c):
                add(c)
            elif len(self.buffer) < p.max_buffer_size:
                self.buffer.append(c)
            else:
                self.counter.skip("dropped_overflow", c.sample.source, "buffer full", bad_input=False)
        while True:
            from_buffer = builder.n < p.prefer_buffer_before and bool(self.buffer)
            if from_buffer:
                c = self.buffer.pop(0)
            else:
                c = self._draw(draw, self.choose_group(rand.uniform()))
            if builder.n + c.length > p.max_num_tokens or not self._fits(builder, c):
                if len(self.buffer) < p.max_buffer_size and not from_buffer:
                    self.buffer.append(c)
                    continue
                if from_buffer:
                    self.buffer.insert(0, c)
                else:
                    self.carry = c
                if builder.num_samples:
                    break
                continue
            add(c)
            if builder.n >= p.expected_num_tokens:
                break
        stats.update(samples=builder.num_samples, tokens=builder.n, buffer_size=len(self.buffer))
        return PackResult(builder.finish(), members, dict(stats))

    # ------------------------------------------------------------------ resume
    def buffer_state(self) -> dict[str, list]:
        """The buffer and the carried sample as ``(group, index)`` references."""
        return {"buffer": [[c.group, c.index] for c in self.buffer],
                "carry": [] if self.carry is None else [self.carry.group, self.carry.index]}

    def restore_buffer(self, state: dict, fetch: Callable[[int, int], "Sample | Skipped"]) -> None:
        """Rebuild the buffer from :meth:`buffer_state`; ``fetch(group, index)`` re-reads a sample."""
        def load(g, i) -> Candidate:
            s = fetch(int(g), int(i))
            if isinstance(s, Skipped):
                raise RuntimeError(f"buffered sample {s.source} no longer decodes: {s.reason}")
            u = sample_usage(s, self.rules)
            return Candidate(int(g), int(i), s, u, u.tokens)
        self.buffer = [load(g, i) for g, i in state["buffer"]]
        self.carry = load(*state["carry"]) if state["carry"] else None
