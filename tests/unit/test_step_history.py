"""The step history: grouped by operation, bounded in size, never dropping running work."""

from __future__ import annotations

from domain.lifecycle import KEEP_OPERATIONS, KEEP_STEPS, Step, StepState, operations, trim_steps


def steps_of(
    number: int, operation: str, count: int, state: StepState = StepState.DONE
) -> list[Step]:
    return [
        Step(
            name=f"s{i}",
            title=f"step {i}",
            state=state,
            operation=operation,
            operation_number=number,
        )
        for i in range(count)
    ]


def test_the_newest_operations_are_kept_whole() -> None:
    history: list[Step] = []
    for n in range(1, KEEP_OPERATIONS + 6):
        history += steps_of(n, "deploy" if n == 1 else f"Scale w to {n}", 3)
    kept, dropped = trim_steps(history)
    assert dropped == 5
    numbers = sorted({s.operation_number for s in kept})
    assert numbers == list(range(6, KEEP_OPERATIONS + 6))
    assert all(sum(s.operation_number == n for s in kept) == 3 for n in numbers)


def test_the_step_bound_holds_but_the_newest_operation_is_always_kept() -> None:
    history = steps_of(1, "deploy", 10) + steps_of(2, "Scale w to 500", KEEP_STEPS + 50)
    kept, dropped = trim_steps(history)
    assert dropped == 1 and {s.operation_number for s in kept} == {2}
    history += steps_of(3, "delete", 2)
    kept, dropped = trim_steps(history)
    assert {s.operation_number for s in kept} == {3} and dropped == 2


def test_a_running_operation_is_never_trimmed() -> None:
    history = steps_of(1, "deploy", 5, StepState.RUNNING)
    for n in range(2, KEEP_OPERATIONS + 4):
        history += steps_of(n, f"op {n}", 1)
    kept, _ = trim_steps(history)
    assert sum(s.operation_number == 1 for s in kept) == 5


def test_steps_are_grouped_in_order() -> None:
    history = steps_of(1, "deploy", 2) + steps_of(2, "retry", 1) + steps_of(3, "retry", 2)
    assert [(op, n, len(s)) for op, n, s in operations(history)] == [
        ("deploy", 1, 2),
        ("retry", 2, 1),
        ("retry", 3, 2),
    ]
    # steps of a run from before operations were recorded form one group
    old = [Step(name="a", title="a"), Step(name="b", title="b")]
    assert [(op, n) for op, n, _ in operations(old)] == [("", 0)]
