"""The `--break` variants: one declared set of protocol steps the checker may remove.

Each break removes one step of the protocol, so that `ksm-proto check --break NAME` can show
why that step exists (the checker must find a violation once it is gone).  The cores consult
breaks by name through a `Breaks` set; asking a `Breaks` about a name that is not declared
here is an error (a typo would otherwise silently disable a break), and so is building one
from an unknown name.

What a break needs to show itself (a kill, a mode, a scenario, two scanners, a configuration)
is declared beside it, for the checker's world factory and the bench's `check` part.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Break:
    name: str
    what: str                            # one line: the step removed
    kill: str | None = None              # the actor whose kill -9 the break needs ("faultd", "ksmd", "vm")
    modes: tuple | None = None           # the notifier modes where it breaks anything (None: all)
    scenario: str = "base"               # the scenario it shows in
    scanners: int = 1                    # 2: a step of the scanners' round protocol
    config: dict = field(default_factory=dict)   # world overrides it shows itself soonest with
    mitigation: str | None = None        # the side-channel defence it is a step of ("vusion")


_DECLARED = (
    Break("cow-reply-before-acks", "the fault handler answers a COW fault and lets go of ptl before the "
          "secondary MMUs acked the new PTE"),
    Break("no-write-protect", "ksmd compares and replaces without write-protecting the page first"),
    Break("no-recheck-pte", "ksmd replaces a page without re-checking, under ptl, that its PTE still maps the "
          "frame it checksummed and compared"),
    Break("free-before-acks", "the old frame is freed (COW and merge) before the secondary MMUs dropped it"),
    Break("early-release", "a COW's old frame is put as soon as the reply carrying the new PTE is sent, before "
          "the VM applied it to its secondary MMUs (no deferred release)",
          # vm1 COWs both its pages away from the KSM frame all four share, vm0 its first: vm0's write of
          # its second page then copies the KSM frame's last mapping, which its put frees
          config={"writes": (((0, 4), (1, 5)), ((0, 2), (1, 3)))}),
    Break("pid-takeover-lock", "page-table locks are the old semaphore + owner pid, taken over when the owner "
          "'looks dead' (reads owner twice)"),
    Break("no-round-barrier", "two scanners: the leader starts a round's visits before the other scanner has "
          "finished the last round's merges (its DONE is collected a round late)", scanners=2),
    Break("no-shard-routing", "two scanners: each plans the pages it visited in its own trees, instead of "
          "routing each page to the owner of its content", scanners=2),
    Break("ahead-across-scans", "two scanners: the pipelined rounds hash the next round's pages ahead across a "
          "full scan's end, so a new full scan takes checksums from before it began", scanners=2),
    Break("no-ksm-lock", "two scanners: an owner tries an mm's page-table lock without first taking the "
          "scanners' ksm lock of that mm", scanners=2),
    Break("no-repair", "after a kill -9 of the fault handler the supervisor restarts it without repairing the "
          "frame table from the PTEs", kill="faultd"),
    Break("no-spte-flush", "a VM keeps its secondary translations when ksmd dies, trusting what it was told",
          # only change_pte mode needs the flush: in the others invalidate_range_start has zapped the
          # secondary translation before any PTE change; unpaced writers keep their sptes writable
          kill="ksmd", modes=("change_pte",), config={"pace": False}),
    Break("no-notifier-lost", "the supervisor's recovery skips each VM's notifier_lost: the open "
          "invalidations of the dead actor are never ended and the secondary MMUs keep their translations",
          kill="ksmd", config={"pace": False}),
    Break("reserve-no-gen", "a fault handler keeps handing out the frames of its reserve after a repair took "
          "every reserve back (its generation is not checked)", kill="ksmd"),
    Break("respawn-before-repair", "the supervisor's recovery starts the successor (and thaws ksmd) before it "
          "repaired the frame table from the PTEs", kill="faultd"),
    Break("no-vm-forget", "after a VM's death the supervisor frees its mm (exit_mmap) without first having the "
          "scanners and its fault handler forget it: ksmd goes on scanning a page table that is gone",
          kill="vm"),
    Break("no-vm-repair", "after a VM's death the supervisor frees its mm without repairing the frame table: "
          "what the VM left half done in its own page table (a PTE cleared, its frame not put) stays", kill="vm",
          # vm0 discards its pages over and over, unpaced: many kill points inside its own MADV_DONTNEED
          config={"writes": (((0, -1), (1, -1), (0, 3), (0, -1), (1, -1), (1, 4)), ((1, 2), (1, 1))),
                  "pace": False}),
    Break("fork-no-write-protect", "fork leaves the parent's PTEs (and its secondary MMUs' translations) "
          "writable while the child maps the same frames", scenario="fork"),
    Break("vusion-no-fake-protect", "mitigation vusion: ksmd leaves the merge candidates it did not merge "
          "writable (no fake merging), so a write tells a merged page from an unmerged one", scenario="same",
          mitigation="vusion"),
    Break("dontneed-no-notify", "MADV_DONTNEED clears PTEs and frees frames without invalidate_range_start/end "
          "to the VM's secondary MMUs"),
    Break("mprotect-no-notify", "mprotect changes the VMA and the PTEs without invalidate_range_start/end to "
          "the VM's secondary MMUs", scenario="fork"),
)
BREAKS: dict[str, Break] = {b.name: b for b in _DECLARED}


def check_break(name: str) -> Break:
    """The declared break `name`, or ValueError naming the declared ones."""
    b = BREAKS.get(name)
    if b is None:
        raise ValueError(f"unknown break {name!r}; one of: {', '.join(BREAKS)}")
    return b


class Breaks(frozenset):
    """The breaks in force (usually none).  `name in brk` for an undeclared name raises ValueError."""

    def __new__(cls, names=()):
        names = [names] if isinstance(names, str) else list(names or ())
        for n in names:
            check_break(n)
        return super().__new__(cls, names)

    def __contains__(self, name) -> bool:
        if name not in BREAKS:
            raise ValueError(f"the cores asked about an undeclared break {name!r}")
        return frozenset.__contains__(self, name)

    def __repr__(self) -> str:
        return f"Breaks({sorted(self)})"


NONE = Breaks()
