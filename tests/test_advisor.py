"""The scan-time advisor (workers/mm/ksm/advisor.py) against mm/ksm.c's scan_time_advisor() worked by hand,
and the scanner's own advisor (workers/mm/ksm/scan.py) running the same function."""
from __future__ import annotations

from workers.mm.ksm.advisor import AdvisorCtx, advisor_start_pages, ewma, scan_time_advisor
from workers.mm.ksm.scan import KsmScan

KNOBS = dict(target_scan_time=5, max_cpu=70, max_pages_to_scan=2000)
# (scan length in ms, ksmd's total CPU time in ns at the scan's end)
SCANS = [(2400, 300_000_000), (3900, 900_000_000), (9000, 1_350_000_000), (4000, 4_550_000_000),
         (500, 4_560_000_000)]
# The kernel's integer steps, by hand (pts: pages_to_scan before the advice; st: scan_time in s;
# cpu: cpu_percent; f: factor; ch: change after the ewma; p: pages before the caps; ppc: per_page_cost)
#  1: pts 500  st 2  cpu 300*100/2000=15  f 500//2=250  ch ewma(0,100)=30    p 500*100//250=200, *30//100=60
#     ppc 500//15=33  min(60, 33*70)=60  max(60, 33*10)=330  min(330, 2000)      -> 330
#  2: pts 330  st 3  cpu 600*100/3000=20  f 166  ch 3*100//2=150, ewma(30,150)=66  p 33000//166=198, *66//100=130
#     ppc 330//20=16  min(130, 1120)=130  max(130, 160)=160                       -> 160
#  3: pts 160  st 9  cpu 450*100/9000=5   f 55   ch 300, ewma(66,300)=136        p 16000//55=290, *136//100=394
#     ppc 160//5=32  min(394, 2240)=394  max(394, 320)=394                        -> 394
#  4: pts 394  st 4  cpu 3200*100/4000=80 f 125  ch 400//9=44, ewma(136,44)=108  p 39400//125=315, *108//100=340
#     ppc 394//80=4  min(340, 4*70=280)=280 (the CPU cap)  max(280, 40)=280       -> 280
#  5: pts 280  st 0->1  cpu 10*100/1000=1 f 500  ch 100//4=25, ewma(108,25)=83   p 28000//500=56, *83//100=46
#     ppc 280//1=280  min(46, 19600)=46  max(46, 2800)=2800  min(2800, 2000)      -> 2000 (advisor_max_pages_to_scan)
EXPECTED = [330, 160, 394, 280, 2000]
EXPECTED_CPU = [15, 20, 5, 80, 1]


def test_ewma_is_the_kernels():
    assert ewma(0, 100) == 30
    assert ewma(30, 150) == 66
    assert ewma(136, 44) == 108


def test_advisor_sequence_matches_the_kernel_formula_by_hand():
    ctx, pts = advisor_start_pages(500)
    assert (ctx, pts) == (AdvisorCtx(0, 0, 0), 500)
    seq, cpus = [], []
    for ms, cpu in SCANS:
        pts, pct = scan_time_advisor(ctx, pts, ms, cpu, **KNOBS)
        seq.append(pts)
        cpus.append(pct)
    assert seq == EXPECTED
    assert cpus == EXPECTED_CPU
    assert (ctx.change, ctx.scan_time, ctx.cpu_time) == (83, 1, 4_560_000_000)


def test_scanner_advisor_is_the_same_function():
    """KsmScan.advise (what ksmd runs at the end of each full scan) gives the same sequence."""
    now = [0.0]
    scan = KsmScan(None, "poll", lambda: now[0])
    cpu = iter([c for _, c in SCANS])
    scan.cpu_clock = lambda: next(cpu)
    scan.knobs.update(advisor_mode=1, pages_to_scan=500, advisor_target_scan_time=5, advisor_max_cpu=70,
                      advisor_max_pages_to_scan=2000)
    seq = []
    for ms, _ in SCANS:
        scan.advise(ms / 1000)
        seq.append(scan.knobs["pages_to_scan"])
    assert seq == EXPECTED


def test_advisor_off_changes_nothing():
    scan = KsmScan(None, "poll", lambda: 0.0)
    scan.knobs.update(advisor_mode=0, pages_to_scan=123)
    scan.advise(1000.0)
    assert scan.knobs["pages_to_scan"] == 123
