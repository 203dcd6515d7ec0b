import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdgate.monitoring.id_index import IdIndex

# Keys chosen to collide in a table of 2 * 8 + 1 = 17 positions (homes 16, 0, 1, 2): long
# probe runs that wrap, with entries at and away from their home.
KEYS = st.sampled_from([16, -1, 0, 17, -17, 1, 18, 2, 19, 2**63 - 1, -(2**63)])


@settings(max_examples=1000, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["set", "delete", "get"]), KEYS, st.integers(0, 1000)),
        max_size=80,
    )
)
def test_index_agrees_with_a_dict(operations: list[tuple[str, int, int]]) -> None:
    index, model = IdIndex(8), dict[int, int]()
    for op, key, value in operations:
        if op == "set" and (key in model or len(model) < 8):
            assert index.set(key, value) == model.get(key, -1)
            model[key] = value
        elif op == "delete":
            index.delete(key)
            model.pop(key, None)
        assert len(index) == len(model)
        assert all(index.get(k) == v for k, v in model.items())
        assert index.get(key) == model.get(key, -1)


def test_a_full_index_refuses_a_new_key() -> None:
    index = IdIndex(2)
    index.set(1, 0)
    index.set(2, 0)
    index.set(2, 5)  # replacing is fine
    with pytest.raises(OverflowError):
        index.set(3, 0)
