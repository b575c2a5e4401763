"""The combine kernel's work for one (token, head) row in one thread, as generated inline PTX.

``triton_topk._combine_kernel`` spreads each row over the lanes of a warp, and its sort
networks move int64 keys between lanes by two shuffles a compare-exchange: on an H200 it is
bound by those shuffles (docs/BENCHMARKS.md). Here each thread takes one row whole: its
candidates sit in its own registers, every network is straight-line code over them and nothing
moves between lanes. The steps are those of the Triton kernel with RANK and SPLIT:

1. rank each half: the row's candidates (``_raw``: fp32 bits << 32 | sub-key) from its places
   in scratch, or, where its count in late is -1, the sorted top K the recheck left in
   half_s / half_i, become ``_pack`` keys (score descending, then index ascending); the top KP
   of the first CAP = 2 KP by two sorts of KP and a bitonic merge; a rare row of more places
   (up to WIDE) has the rest sorted and merged in MORE at a time, behind a branch that the
   rows of a warp take only where one of them needs it;
2. combine: the sums of half-rank 0 on either side are in descending order already, and so,
   for each a >= 1, are the sums of the pairs (a, b), b >= 1, with (a + 1)(b + 1) <= K: those
   runs are merged (the two shortest first), and two bitonic merges give the top K of the
   three lists. A pair's index in its key is a * KP + b, in the same order as its place in the
   Triton kernel's pair list, so ties rank alike;
3. the softmax over the K scores (fp32: exp as ``tl.exp`` lowers it, the sum in rank order,
   one rounded division), the slots i1[a] * n_keys + i2[b] and, with SAVE, the half-ranks and
   each ranked half's indices.

The top K of a set of distinct keys does not depend on the network that finds it, so the
slots and the scores (raw sums) are those of the Triton kernel bit for bit; the softmax's sum
runs in another order, so the weights agree to an ulp or two.

The program is written once (``_program``) against a builder: ``Emit`` turns it into PTX,
``Emulate`` runs it in Python on one row's inputs, which is how the CPU tests check the
networks and the data flow that the GPU then runs. Comparators against a key known to be the
lowest possible (padding) are dropped while the program is built.
"""

from __future__ import annotations

import functools
import struct

NEG = -9223372036854775807  # below every real key: padding and places past a row's count
MORE = 8  # places a row's candidates past the first 2 * kp are merged in by (a rare row's)
_MASK31 = 0x7FFFFFFF
_NEG_INF_BITS = 0xFF800000
_LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------
# sorting networks (descending: the larger key goes to the lower place)


@functools.lru_cache(maxsize=16)
def _sort_pairs(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort of n (a power of two) places: its comparators (i < j)."""
    out: list[tuple[int, int]] = []

    def merge(lo: int, length: int, r: int) -> None:
        step = r * 2
        if step < length:
            merge(lo, length, step)
            merge(lo + r, length, step)
            out.extend((i, i + r) for i in range(lo + r, lo + length - r, step))
        else:
            out.append((lo, lo + r))

    def sort(lo: int, length: int) -> None:
        if length > 1:
            half = length // 2
            sort(lo, half)
            sort(lo + half, half)
            merge(lo, length, 1)

    sort(0, n)
    return tuple(out)


@functools.lru_cache(maxsize=16)
def _bitonic_pairs(n: int) -> tuple[tuple[int, int], ...]:
    """The comparators that sort a bitonic sequence of n (a power of two) places."""
    out = []
    size = n // 2
    while size:
        for start in range(0, n, 2 * size):
            out.extend((i, i + size) for i in range(start, start + size))
        size //= 2
    return tuple(out)


@functools.lru_cache(maxsize=16)
def rest_pairs(k: int) -> tuple[tuple[int, int], ...]:
    """Half-rank pairs (a, b), a, b >= 1, that can reach the top k: (a + 1)(b + 1) <= k."""
    return tuple((a, b) for a in range(1, k) for b in range(1, k) if (a + 1) * (b + 1) <= k)


class _Const:
    """A key known while the program is built (padding, or a sum with a masked half-score)."""

    __slots__ = ("value",)

    def __init__(self, value: int):
        self.value = value


def _is_neg(x) -> bool:
    return isinstance(x, _Const) and x.value == NEG


def _ce(b, x, y):
    """(larger, smaller) of two keys; nothing is emitted against padding."""
    if _is_neg(y):
        return x, y
    if _is_neg(x):
        return y, x
    return b.ce(x, y)


def _max(b, x, y):
    if _is_neg(y):
        return x
    if _is_neg(x):
        return y
    return b.max(x, y)


def _network(b, keys: list, pairs) -> list:
    keys = list(keys)
    for i, j in pairs:
        keys[i], keys[j] = _ce(b, keys[i], keys[j])
    return keys


def _sort(b, keys: list) -> list:
    return _network(b, keys, _sort_pairs(len(keys)))


def _merge_top(b, x: list, y: list) -> list:
    """The top len(x) of two descending lists: the larger of x and y reversed is bitonic."""
    n = len(x)
    return _network(b, [_max(b, x[i], y[n - 1 - i]) for i in range(n)], _bitonic_pairs(n))


def _merge_tail(b, x: list, y: list) -> list:
    """The top len(x) of a descending list x and a shorter descending list y: the larger of
    x's tail and y reversed, after x's head, is bitonic (once an element of y wins, every
    later one does)."""
    n, m = len(x), len(y)
    tail = [_max(b, x[n - m + i], y[m - 1 - i]) for i in range(m)]
    return _network(b, x[: n - m] + tail, _bitonic_pairs(n))


def _merge_runs(b, runs: list[list], kp: int) -> list:
    """The top kp of descending runs, descending (padded to kp): the two shortest merged, as
    a bitonic sequence, until one is left."""
    runs = [r for r in runs if r]
    if not runs:
        return [_Const(NEG)] * kp
    while len(runs) > 1:
        runs.sort(key=len)
        x, y = runs.pop(0), runs.pop(0)
        n = len(x) + len(y)
        p = 1 << (max(len(x), len(y)) - 1).bit_length()
        x, y = x + [_Const(NEG)] * (p - len(x)), y + [_Const(NEG)] * (p - len(y))
        if p >= kp:  # only the top kp are wanted
            merged = _merge_top(b, x[:kp] + [_Const(NEG)] * (kp - len(x[:kp])), y[:kp])
        else:
            merged = _network(b, x + y[::-1], _bitonic_pairs(2 * p))
        runs.append(merged[: min(n, kp)])
    return runs[0] + [_Const(NEG)] * (kp - len(runs[0]))


def _top(b, keys: list, kp: int) -> list:
    """The top kp of keys (a multiple of kp of them), descending."""
    best = _sort(b, keys[:kp])
    for start in range(kp, len(keys), kp):
        best = _merge_top(b, best, _sort(b, keys[start : start + kp]))
    return best


def pack_key(score_bits: int, index: int) -> int:
    """``triton_topk._pack`` of an fp32 score (its bits) and an index, as a Python int."""
    bits = score_bits - (1 << 32) if score_bits & 0x80000000 else score_bits
    ordered = bits ^ _MASK31 if bits < 0 else bits
    return (ordered << 32) | (_MASK31 - index)


def unpack_key(key: int) -> tuple[int, int]:
    """(fp32 bits, index) of a ``pack_key`` key."""
    ordered = key >> 32
    bits = ordered ^ _MASK31 if ordered < 0 else ordered
    return bits & 0xFFFFFFFF, _MASK31 - (key & _MASK31)


# ---------------------------------------------------------------------------------------------
# the program


@functools.lru_cache(maxsize=16)
def _shape(k: int, kp: int, cap: int, wide: int) -> None:
    if not (1 <= k <= kp <= 32 and kp & (kp - 1) == 0):
        raise ValueError(f"k must be in [1, kp] and kp a power of two up to 32, got {k}, {kp}")
    if cap != 2 * kp or wide % cap:
        raise ValueError(f"cap must be 2 * kp and wide a multiple of it, got {cap}, {wide}")


def _program(b, k: int, kp: int, cap: int, wide: int, softmax: bool, save: bool) -> None:
    _shape(k, kp, cap, wide)
    scores = []
    for h in (0, 1):
        best = _top(b, b.load(h, 0, cap), kp)
        if wide > cap:  # a rare row of more than cap places: MORE at a time merged in
            best = b.materialise(best)
            for start in range(cap, wide, MORE):
                b.begin_more(h, start)
                more = _merge_tail(b, best, _sort(b, b.load(h, start, MORE)))
                best = b.end_more(best, more)
            b.end_blocks(h)
        s, i = zip(*(b.unpack(best[j]) for j in range(k)), strict=True)
        b.keep_index(h, list(i), save)
        scores.append(list(s) + [None] * (kp - k))  # None: -inf (masked half-ranks)
    t1, t2 = scores
    # for each a the sums over b are a descending run (t2 is): merged, not sorted
    runs: dict[int, list] = {}
    for a, c in rest_pairs(k):
        runs.setdefault(a, []).append(b.pack(b.fadd(t1[a], t2[c]), a * kp + c))
    rest_top = _merge_runs(b, list(runs.values()), kp)
    row0 = [b.pack(b.fadd(t1[0], t2[c]), c) for c in range(kp)]
    col0 = [
        b.pack(b.fadd(t1[c + 1], t2[0]), (c + 1) * kp)
        if c + 1 < k
        else _Const(pack_key(_NEG_INF_BITS, 0))
        for c in range(kp)
    ]
    best = _merge_top(b, row0, col0)
    best = _merge_top(b, best, rest_top)
    b.finish([b.unpack(best[j]) for j in range(k)], kp, softmax, save)


# ---------------------------------------------------------------------------------------------
# running it in Python (the tests' oracle for the PTX's data flow)


def _f32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]


def _bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


class Emulate:
    """Runs ``_program`` on one row: counts (2,), places (2, wide) int64 ``_raw`` candidates,
    half_s (2, k) fp32 and half_i (2, k) int32 (read where a count is -1), n_keys.

    After ``run``: ``scores`` (k floats: softmax weights or sums), ``slots`` (k ints),
    ``ranks`` (k (a, b) pairs) and ``index`` (2, k: each half's sorted sub-keys)."""

    def __init__(self, counts, places, half_s, half_i, n_keys: int, k: int, wide: int):
        self.counts, self.places, self.half_s, self.half_i = counts, places, half_s, half_i
        self.n_keys, self.k, self.wide = n_keys, k, wide
        self._more: list = []
        self.index: list = [None, None]

    def run(self, kp: int, softmax: bool, save: bool = False) -> Emulate:
        _program(self, self.k, kp, 2 * kp, self.wide, softmax, save)
        return self

    def _val(self, x) -> int:
        return x.value if isinstance(x, _Const) else x

    def load(self, h: int, start: int, n: int) -> list:
        count = int(self.counts[h])
        keys = []
        for j in range(start, start + n):
            if count >= 0 and j < min(count, self.wide):
                raw = int(self.places[h][j]) & 0xFFFFFFFFFFFFFFFF
                keys.append(pack_key(raw >> 32, raw & _MASK31))
            elif count < 0 and j < self.k:
                keys.append(pack_key(_bits(float(self.half_s[h][j])), int(self.half_i[h][j])))
            else:
                keys.append(NEG)
        return keys

    def ce(self, x, y):
        x, y = self._val(x), self._val(y)
        return (x, y) if x >= y else (y, x)

    def max(self, x, y):
        return max(self._val(x), self._val(y))

    def materialise(self, keys):
        return [self._val(x) for x in keys]

    def begin_more(self, h: int, start: int) -> None:
        self._more.append(int(self.counts[h]) > start)

    def end_more(self, best, more):
        return [self._val(x) for x in (more if self._more.pop() else best)]

    def end_blocks(self, h: int) -> None:
        pass

    def unpack(self, key):
        bits, index = unpack_key(self._val(key))
        return _f32(bits), index

    def keep_index(self, h: int, index: list, save: bool) -> None:
        self.index[h] = index

    def fadd(self, x, y):
        import numpy as np

        x = np.float32("-inf") if x is None else np.float32(x)
        y = np.float32("-inf") if y is None else np.float32(y)
        with np.errstate(invalid="ignore"):
            return float(x + y)

    def pack(self, score: float, index: int) -> int:
        return pack_key(_bits(score), index)

    def finish(self, picks, kp: int, softmax: bool, save: bool) -> None:
        import numpy as np

        shift = kp.bit_length() - 1
        s = np.array([p[0] for p in picks], np.float32)
        self.ranks = [(p[1] >> shift, p[1] & (kp - 1)) for p in picks]
        self.slots = [self.index[0][a] * self.n_keys + self.index[1][c] for a, c in self.ranks]
        if softmax:
            e = np.exp2((s - s.max()) * np.float32(_LOG2E)).astype(np.float32)
            s = e / e.sum(dtype=np.float32)
        self.scores = [float(x) for x in s]


# ---------------------------------------------------------------------------------------------
# PTX

# operands of the generated block ($0 is a dummy result: inline PTX must return one)
OPERANDS = (
    "ok",  # the row exists
    "count1", "count2",  # each half's candidates in scratch; -1: sorted in half_s / half_i
    "scratch1", "scratch2",  # the row's places (int64) in scratch, each half
    "half_s1", "half_s2",  # its K sorted scores (fp32) of each half, where the count is -1
    "half_i1", "half_i2",  # and their sub-keys (int32); with SAVE each ranked half's go there
    "out_s", "out_slot",  # its K weights or scores (fp32) and slots (int64)
    "rank1", "rank2",  # with SAVE, the half-ranks of each pick (int32)
    "n_keys",
)  # fmt: skip
CONSTRAINTS_ = "=r,r,r,r,l,l,l,l,l,l,l,l,l,l,r"


def _op(name: str) -> str:
    return f"${OPERANDS.index(name) + 1}"


class Emit:
    """Writes ``_program`` as one block of PTX for a thread's row (see OPERANDS)."""

    def __init__(self, k: int, wide: int, prefetch: bool = False):
        self.k, self.wide, self.prefetch = k, wide, prefetch
        self.lines: list[str] = []
        self.n = {"r": 0, "d": 0}

    def reg(self, kind: str) -> str:
        self.n[kind] += 1
        return f"{kind}{self.n[kind] - 1}"

    def put(self, line: str) -> None:
        self.lines.append(line)

    def key(self, x) -> str:
        """A key's register (a known key moved into one)."""
        if isinstance(x, _Const):
            r = self.reg("d")
            self.put(f"mov.b64 {r}, {x.value};")
            return r
        return x

    def prologue(self) -> None:
        self.put(f"setp.eq.s32 pz, {_op('ok')}, 0;")
        self.put("@pz bra END;")
        # each half: pr (ranked here: count >= 0) and lim (places that hold a candidate)
        for h, c in ((0, _op("count1")), (1, _op("count2"))):
            self.put(f"setp.ge.s32 pr{h}, {c}, 0;")
            self.put(f"min.s32 t, {c}, {self.wide};")
            self.put(f"selp.b32 lim{h}, t, {self.k}, pr{h};")
        if self.prefetch:  # the second half's places into L1 while the first is ranked
            for line in range(0, 8 * min(self.wide, 64), 128):
                self.put(f"@pr1 prefetch.global.L1 [{_op('scratch2')}+{line}];")

    def load(self, h: int, start: int, n: int) -> list:
        sc = _op("scratch1" if h == 0 else "scratch2")
        hs = _op("half_s1" if h == 0 else "half_s2")
        hi = _op("half_i1" if h == 0 else "half_i2")
        count = _op("count1" if h == 0 else "count2")
        lo = [self.reg("r") for _ in range(n)]
        hi_w = [self.reg("r") for _ in range(n)]
        for p in range(0, n, 2):  # two places a load, where the first holds a candidate
            j = start + p
            self.put(f"setp.lt.and.s32 q, {j}, {count}, pr{h};")
            self.put(f"@q ld.global.v4.b32 {{{lo[p]}, {hi_w[p]}, {lo[p + 1]}, {hi_w[p + 1]}}}, "
                     f"[{sc}+{8 * j}];")  # fmt: skip
        if start == 0:  # a row the recheck ranked: its sorted top K
            vec = 4 if self.k % 4 == 0 else 1
            for j in range(0, min(self.k, n), vec):
                if vec == 4:
                    self.put(f"@!pr{h} ld.global.v4.b32 {{{', '.join(hi_w[j:j + 4])}}}, "
                             f"[{hs}+{4 * j}];")  # fmt: skip
                    self.put(f"@!pr{h} ld.global.v4.b32 {{{', '.join(lo[j:j + 4])}}}, "
                             f"[{hi}+{4 * j}];")  # fmt: skip
                else:
                    self.put(f"@!pr{h} ld.global.b32 {hi_w[j]}, [{hs}+{4 * j}];")
                    self.put(f"@!pr{h} ld.global.b32 {lo[j]}, [{hi}+{4 * j}];")
        keys = []
        for p in range(n):
            key = self.reg("d")
            self.put(f"mov.b64 {key}, {{{self.flip_index(lo[p])}, {self.flip_order(hi_w[p])}}};")
            self.put(f"setp.lt.s32 q, {start + p}, lim{h};")
            self.put(f"selp.b64 {key}, {key}, neg, q;")
            keys.append(key)
        return keys

    def ce(self, x, y):
        hi, lo = self.reg("d"), self.reg("d")
        x, y = self.key(x), self.key(y)
        # the smaller as x ^ y ^ larger: a select and a compare, where two selects would
        # have ptxas compare twice (a min and a max)
        self.put(f"setp.lt.s64 q, {x}, {y};")
        self.put(f"selp.b64 {hi}, {y}, {x}, q;")
        self.put(f"xor.b64 {lo}, {x}, {y};")
        self.put(f"xor.b64 {lo}, {lo}, {hi};")
        return hi, lo

    def max(self, x, y):
        out = self.reg("d")
        self.put(f"max.s64 {out}, {self.key(x)}, {self.key(y)};")
        return out

    def materialise(self, keys):
        out = []
        for x in keys:
            if isinstance(x, _Const):
                r = self.reg("d")
                self.put(f"mov.b64 {r}, {x.value};")
                x = r
            out.append(x)
        return out

    def begin_more(self, h: int, start: int) -> None:
        """Past the row's count: no later block holds a candidate either, skip them all."""
        self.put(f"setp.le.s32 q, {_op('count1' if h == 0 else 'count2')}, {start};")
        self.put(f"@q bra MORE{h};")

    def end_more(self, best, more):
        for b_, m in zip(best, more, strict=True):
            self.put(f"mov.b64 {b_}, {self.key(m)};")
        return best

    def end_blocks(self, h: int) -> None:
        self.put(f"MORE{h}:")

    def flip_order(self, word: str) -> str:
        """fp32 bits <-> an int32 with the float's order (negatives' magnitude bits flipped):
        the high word of a key (``pack_key``); its own inverse."""
        out = self.reg("r")
        self.put(f"shr.s32 t, {word}, 31;")
        self.put(f"and.b32 t, t, {_MASK31};")
        self.put(f"xor.b32 {out}, {word}, t;")
        return out

    def flip_index(self, word: str) -> str:
        """An index <-> the low word of a key: 2**31 - 1 minus its low 31 bits."""
        out = self.reg("r")
        self.put(f"and.b32 t, {word}, {_MASK31};")
        self.put(f"sub.s32 {out}, {_MASK31}, t;")
        return out

    def unpack(self, key):
        hi, lo = self.reg("r"), self.reg("r")
        self.put(f"mov.b64 {{{lo}, {hi}}}, {self.key(key)};")
        return self.flip_order(hi), self.flip_index(lo)

    def keep_index(self, h: int, index: list, save: bool) -> None:
        """Each half's sorted sub-keys to local memory (the picks index them), and with SAVE
        to half_i where the row was ranked here."""
        base = 0 if h == 0 else 4 * 32
        hi = _op("half_i1" if h == 0 else "half_i2")
        for j in range(0, len(index), 4):  # local memory: 16-byte aligned
            part = index[j : j + 4]
            if len(part) == 4:
                self.put(f"st.local.v4.b32 [loc+{base + 4 * j}], {{{', '.join(part)}}};")
            else:
                for m, r in enumerate(part):
                    self.put(f"st.local.b32 [loc+{base + 4 * (j + m)}], {r};")
        if not save:
            return
        vec = 4 if self.k % 4 == 0 else 1  # rows of k int32: 16-byte aligned where 4 | k
        for j in range(0, len(index), vec):
            part = index[j : j + vec]
            self.put(f"@pr{h} st.global.v{vec}.b32 [{hi}+{4 * j}], {{{', '.join(part)}}};"
                     if vec == 4 else f"@pr{h} st.global.b32 [{hi}+{4 * j}], {part[0]};")  # fmt: skip

    def fadd(self, x, y):
        out = self.reg("r")
        x = f"0f{_NEG_INF_BITS:08X}" if x is None else x
        y = f"0f{_NEG_INF_BITS:08X}" if y is None else y
        self.put(f"add.rn.f32 {out}, {x}, {y};")
        return out

    def pack(self, score, index: int):
        low, key = self.reg("r"), self.reg("d")
        self.put(f"mov.b32 {low}, {_MASK31 - index};")
        self.put(f"mov.b64 {key}, {{{low}, {self.flip_order(score)}}};")
        return key

    def fold(self, op: str, regs: list) -> str:
        """regs[0] op regs[1] op ... in order (one register each step)."""
        acc = regs[0]
        for x in regs[1:]:
            out = self.reg("r")
            self.put(f"{op} {out}, {acc}, {x};")
            acc = out
        return acc

    def softmax(self, scores: list) -> list:
        """exp(s - max) / sum in fp32: exp as ``tl.exp`` lowers it (ex2 of s * log2 e), the sum
        in rank order, one rounded division."""
        top = self.fold("max.f32", scores)
        log2e = struct.unpack("<I", struct.pack("<f", _LOG2E))[0]
        e = []
        for s in scores:
            x = self.reg("r")
            self.put(f"sub.f32 t, {s}, {top};")
            self.put(f"mul.f32 t, t, 0f{log2e:08X};")
            self.put(f"ex2.approx.f32 {x}, t;")
            e.append(x)
        total = self.fold("add.rn.f32", e)
        out = []
        for x in e:
            w = self.reg("r")
            self.put(f"div.rn.f32 {w}, {x}, {total};")
            out.append(w)
        return out

    def local_index(self, offset: str, base: int) -> str:
        """The sub-key at local byte base + 4 * offset (into a register)."""
        out = self.reg("r")
        self.put(f"shl.b32 t, {offset}, 2;")
        self.put(f"add.u32 t, t, {base};")
        self.put("cvt.u64.u32 addr, t;")
        self.put("add.u64 addr, addr, loc_base;")
        self.put(f"ld.local.b32 {out}, [addr];")
        return out

    def store_row(self, ptr: str, regs: list, size: int) -> None:
        """regs (size bytes each) at ptr, 16 bytes a store where the row's length allows."""
        vec = 16 // size if len(regs) % (16 // size) == 0 else 1
        for j in range(0, len(regs), vec):
            part = regs[j : j + vec]
            if vec > 1:
                self.put(f"st.global.v{vec}.b{8 * size} [{ptr}+{size * j}], "
                         f"{{{', '.join(part)}}};")  # fmt: skip
            else:
                self.put(f"st.global.b{8 * size} [{ptr}+{size * j}], {part[0]};")

    def finish(self, picks, kp: int, softmax: bool, save: bool) -> None:
        shift = kp.bit_length() - 1
        scores = [p[0] for p in picks]
        if softmax:
            scores = self.softmax(scores)
        slots, ranks = [], []
        for _, pick in picks:
            a, c, s64 = self.reg("r"), self.reg("r"), self.reg("d")
            self.put(f"shr.u32 {a}, {pick}, {shift};")
            self.put(f"and.b32 {c}, {pick}, {kp - 1};")
            ia, ic = self.local_index(a, 0), self.local_index(c, 4 * 32)
            self.put(f"mul.wide.s32 {s64}, {ia}, {_op('n_keys')};")
            self.put(f"cvt.s64.s32 w, {ic};")
            self.put(f"add.s64 {s64}, {s64}, w;")
            slots.append(s64)
            ranks.append((a, c))
        self.store_row(_op("out_s"), scores, 4)
        self.store_row(_op("out_slot"), slots, 8)
        if save:
            self.store_row(_op("rank1"), [r[0] for r in ranks], 4)
            self.store_row(_op("rank2"), [r[1] for r in ranks], 4)

    def text(self) -> str:
        head = [
            "{",
            ".reg .pred pz, pr0, pr1, q;",
            ".reg .b32 t, lim0, lim1;",
            ".reg .b64 w, addr, loc_base, neg;",
            f".reg .b32 r<{max(1, self.n['r'])}>;",
            f".reg .b64 d<{max(1, self.n['d'])}>;",
            ".local .align 16 .b32 loc[64];",
            "mov.u64 loc_base, loc;",
            f"mov.b64 neg, {NEG};",
        ]
        return "\n".join(head + self.lines + ["END:", "mov.u32 $0, 0;", "}"])


@functools.lru_cache(maxsize=32)
def combine_asm(k: int, kp: int, wide: int, softmax: bool, save: bool,
                prefetch: bool = False) -> str:  # fmt: skip
    """The PTX block that combines one row a thread (operands: ``OPERANDS``); with prefetch
    the second half's first places are asked into L1 at the start."""
    b = Emit(k, wide, prefetch)
    b.prologue()
    _program(b, k, kp, 2 * kp, wide, softmax, save)
    return b.text()


def instruction_count(k: int, kp: int, wide: int, softmax: bool, save: bool = False) -> int:
    """PTX instructions in the block (every path): for the benchmark's notes."""
    return sum(1 for line in combine_asm(k, kp, wide, softmax, save).splitlines()
               if line.endswith(";") and not line.startswith("."))  # fmt: skip
