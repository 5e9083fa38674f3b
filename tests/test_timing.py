"""pipeline.timing: the phase clock of `doit install` (fake clocks; no processes)."""

from __future__ import annotations

from pipeline.timing import PhaseClock, PhaseTime, process_age, summary, table


def fake_clock(walls: list[float], cpus: list[tuple[float, float]]) -> PhaseClock:
    wall, cpu = iter(walls), iter(cpus)
    return PhaseClock(wall=lambda: next(wall), cpu=lambda: next(cpu))


def test_laps_time_consecutive_steps_with_their_childrens_cpu():
    clock = fake_clock([10.0, 11.5, 14.0], [(1.0, 0.0), (2.0, 0.0), (2.5, 3.0)])
    clock.begin()
    clock.lap("hash")
    clock.lap("wheels")
    assert clock.phases == (
        PhaseTime("hash", 1.5, 1.0, 0.0),
        PhaseTime("wheels", 2.5, 3.5, 3.0),
    )


def test_a_lap_before_begin_records_nothing_but_starts_the_next():
    clock = fake_clock([5.0, 6.0], [(0.0, 0.0), (0.5, 0.0)])
    clock.lap("lost")
    clock.lap("kept")
    assert clock.phases == (PhaseTime("kept", 1.0, 0.5, 0.0),)


def test_a_phase_is_recorded_also_when_its_block_raises():
    clock = fake_clock([0.0, 2.0], [(0.0, 0.0), (1.0, 0.25)])
    try:
        with clock.phase("patch"):
            raise ValueError("refused")
    except ValueError:
        pass
    assert clock.phases == (PhaseTime("patch", 2.0, 1.25, 0.25),)


def test_startup_takes_the_process_age_and_all_cpu_so_far():
    clock = fake_clock([], [(0.3, 0.1)])
    clock.add_startup(0.5)
    assert clock.phases == (PhaseTime("start-up", 0.5, 0.4, 0.1),)


def test_process_age_is_small_and_positive_for_a_running_test():
    age = process_age()
    assert age is not None and 0 < age < 24 * 3600


def test_summary_is_one_line_with_totals_and_table_has_a_row_per_phase():
    phases = [PhaseTime("start-up", 0.4, 0.3), PhaseTime("wheel install", 12.0, 25.0, 24.0)]
    line = summary(phases)
    assert "\n" not in line
    assert line == (
        "timing (s, wall/cpu): start-up 0.40/0.30, wheel install 12.00/25.00; total 12.4/25.3"
    )
    rows = table(phases).splitlines()
    assert len(rows) == 4 and rows[0].startswith("phase") and rows[-1].startswith("total")
    assert rows[2].split() == ["wheel", "install", "12.00", "25.00", "24.00"]


def test_phase_json_is_rounded_to_milliseconds():
    assert PhaseTime("x", 1.23456, 2.0, 0.0004).to_json() == ["x", 1.235, 2.0, 0.0]
    assert PhaseClock().phases == ()
