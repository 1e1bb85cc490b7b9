"""thdkit's compiled programs stay in one bounded LRU: eager calls on many shapes do not grow
the process's memory mappings without bound, and a repeated shape compiles nothing."""

from __future__ import annotations

import gc
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import thdkit
from thdkit._src import programs


@pytest.fixture
def small_cache():
    old = programs.max_programs()
    programs.set_max_programs(4)
    yield
    programs.set_max_programs(old)


def _maps() -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for _ in maps)


def _call(seq_len: int) -> jax.Array:
    ids = np.ones((1, seq_len), np.int32)
    ids[0, seq_len // 2 :] = 2
    pos = np.concatenate([np.arange(seq_len // 2), np.arange(seq_len - seq_len // 2)])[None]
    x = jnp.ones((1, seq_len, 1, 4))
    return thdkit.attention(x, x, x, segment_ids_q=ids, segment_pos_q=pos, max_segments_per_seq=2)


def test_a_repeated_shape_is_a_hit_and_old_entries_are_evicted(small_cache):
    _call(12)
    before = programs.cache_info()
    _call(12)
    after = programs.cache_info()
    assert after["misses"] == before["misses"] and after["hits"] > before["hits"]
    for seq_len in range(14, 24, 2):
        _call(seq_len)
    info = programs.cache_info()
    assert info["size"] <= 4 and info["evictions"] > before["evictions"]


def test_set_max_programs_checks_its_argument():
    with pytest.raises(TypeError, match="limit must be an int"):
        programs.set_max_programs(2.5)
    with pytest.raises(ValueError, match="limit must be >= 1"):
        programs.set_max_programs(0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_memory_mappings_stay_bounded_over_many_shapes(small_cache):
    for seq_len in range(8, 16):
        _call(seq_len)
    gc.collect()
    start = _maps()
    shapes = range(16, 40)
    for seq_len in shapes:
        _call(seq_len)
    gc.collect()
    per_shape = (_maps() - start) / len(shapes)
    # Kept without bound, every new shape adds its programs' mappings (hundreds for attention);
    # evicted, a program leaves a few behind in JAX's own bounded caches.
    assert per_shape < 40, f"{per_shape:.1f} memory mappings per new shape"


def _hammer(threads: int, calls: int, call) -> list[BaseException]:
    """Runs ``call(rng)`` ``calls`` times in each of ``threads`` threads, switching threads as
    often as the interpreter allows, and returns what they raised."""
    import threading

    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(calls):
                call(rng)
        except BaseException as error:
            errors.append(error)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        pool = [threading.Thread(target=worker, args=(seed,)) for seed in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    return errors


def test_the_lru_is_safe_under_threads_with_evictions():
    """Lookups, reorderings and evictions from several threads at once: no lookup fails, every
    value is its key's, and the size never passes the limit. (Before the lock, another thread's
    eviction between a lookup and its reordering raised KeyError within a few thousand calls.)"""
    lru = programs._LRU(4)
    sizes: list[int] = []

    def call(rng):
        key = int(rng.integers(6))
        assert lru.get(key, lambda: ("value", key)) == ("value", key)
        sizes.append(len(lru))

    errors = _hammer(threads=4, calls=20_000, call=call)
    assert not errors, repr(errors[0])
    assert max(sizes) <= 4
    assert lru.stats["evictions"] > 1000 and lru.stats["hits"] > 1000


def test_programs_from_several_threads_are_each_right(small_cache):
    """Compiled programs shared by threads while the cache evicts: every result is its own."""

    @programs.program(static_argnames=("power",))
    def raise_to(x, *, power):
        return x**power

    inputs = [np.arange(n, dtype=np.float32) for n in range(1, 4)]

    def call(rng):
        x, power = inputs[rng.integers(len(inputs))], int(rng.integers(1, 3))
        np.testing.assert_array_equal(np.asarray(raise_to(x, power=power)), x**power)

    before = programs.cache_info()["evictions"]
    errors = _hammer(threads=3, calls=60, call=call)
    assert not errors, repr(errors[0])
    assert programs.cache_info()["size"] <= 4
    assert programs.cache_info()["evictions"] > before
