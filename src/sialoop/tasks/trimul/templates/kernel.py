"""Generation-0 TriMul harness: a GPU MODE submission (`custom_kernel(data)`) whose knobs pick
among real building blocks. At its defaults it computes exactly what the reference does (eager
float32, five projections, an einsum over the channel-last layout), so the loop starts from the
reference and every gain is the knob search's.

The blocks:
- BLOCK: rows (positions i, j) per block of the input and output stages (0: the whole tensor at
  once). A block's LayerNorm, projections, gating and output projection run while its rows are
  in cache, and write into buffers allocated once, instead of making each stage a pass over
  gigabytes of fresh memory (on a CPU, first-touch page faults of large temporaries cost as
  much as the GEMMs);
- PROJ "fused": one GEMM against the five gated projections' weights stacked [5H, C];
- LAYOUT "channel_first": the projections land as [5H, rows] (weights times the transposed
  input), so the triangle product is one batched GEMM per channel on contiguous slices, with no
  permute copies, and the output projection reads the channel-first result through a
  transposed view;
- *_DTYPE: the GEMMs' dtype per stage. "bfloat16" pays where the CPU or GPU computes it
  natively; "bf16x2" and "bf16x3" split float32 operands into bfloat16 high and low parts and
  stack them along the reduced axis (x.W ~ x_hi.W_hi + x_hi.W_lo [+ x_lo.W_hi]), one bfloat16
  GEMM with float32 accumulation that is 2-3x the work but nearly float32 accurate. LayerNorms,
  gating and the sigmoids stay float32, which bfloat16 fails on cauchy inputs;
- INPLACE: gate and mask in place instead of allocating each product;
- CHUNK: channels per batched GEMM of the triangle product (0: all at once), bounding its
  temporaries;
- ALLOC "retain": glibc keeps freed memory for reuse (mallopt: no trimming, no mmap) instead
  of returning it to the OS, the CPU counterpart of CUDA's caching allocator; without it, each
  large temporary and each call's buffers are fresh pages whose first-touch faults cost
  about a nanosecond per byte on the 2-core VMs measured. It acts on the worker process;
- COMPILE: torch.compile of the whole-tensor path's elementwise stages; THREADS: torch's
  threads (0: as given).

The file defines `custom_kernel` and no `solve`: it is its own program, and runs unchanged as a
GPU MODE submission.
"""

import ctypes

import torch
import torch.nn.functional as F

BLOCK = 0
PROJ = "separate"
LAYOUT = "channel_last"
PROJ_DTYPE = "float32"
TRI_DTYPE = "float32"
OUT_DTYPE = "float32"
INPLACE = False
CHUNK = 0
COMPILE = False
THREADS = 0
ALLOC = "system"
KNOBS = {
    "BLOCK": {"family": "blocking", "values": [0, 1024, 2048, 4096, 8192]},
    "CHUNK": {"family": "blocking", "values": [0, 8, 16, 32, 64]},
    "PROJ_DTYPE": {"family": "dtype", "choices": ["float32", "bf16x3", "bf16x2", "bfloat16"]},
    "TRI_DTYPE": {"family": "dtype", "choices": ["float32", "bfloat16"]},
    "OUT_DTYPE": {"family": "dtype", "choices": ["float32", "bf16x3", "bf16x2", "bfloat16"]},
    "ALLOC": {"family": "memory", "choices": ["system", "retain"]},
    "LAYOUT": {"family": "layout", "choices": ["channel_last", "channel_first"]},
    "PROJ": {"family": "fusion", "choices": ["separate", "fused"]},
    "INPLACE": {"family": "fusion", "choices": [False, True]},
    "COMPILE": {"family": "compile", "choices": [False, True]},
    "THREADS": {"family": "threads", "values": [0, 1, 2, 4, 8]},
}  # families in the order a search without evidence should try them (largest payoff first);
# the GEMM dtypes from most to least accurate
SIGNALS = {}
ANSWER = "program"

_NAMES = ("left_proj", "right_proj", "left_gate", "right_gate", "out_gate")
_BF = torch.bfloat16


def _split(t):
    hi = t.to(_BF)
    return hi, (t - hi.float()).to(_BF)


def _weight(wt, mode):
    """A [out, in] float32 weight as the right operand of `mode`: [out, k*in] for the splits."""
    if mode == "float32":
        return wt
    if mode == "bfloat16":
        return wt.to(_BF)
    hi, lo = _split(wt)
    return torch.cat([hi, lo] if mode == "bf16x2" else [hi, lo, hi], 1)


def _act(a, mode):
    """A [rows, in] float32 activation as the left operand of `mode`, matching `_weight`."""
    if mode == "float32":
        return a
    if mode == "bfloat16":
        return a.to(_BF)
    if mode == "bf16x2":
        hi = a.to(_BF)
        return torch.cat([hi, hi], 1)
    hi, lo = _split(a)
    return torch.cat([hi, hi, lo], 1)


def _linear(a, wk, mode, first):
    """`a @ w.T` ([rows, out]) or, channel-first, `w @ a.T` ([out, rows]), as float32, with the
    weight already in `_weight(w, mode)` form."""
    ak = _act(a, mode)
    out = wk @ ak.T if first else ak @ wk.T
    return out.float()


def _project(x, wks):
    """The five projections of the normalised input `x` [rows, C]: channel-last [rows, H] each,
    or channel-first [H, rows] each, as float32. `wks`: the fused weight or the five."""
    first = LAYOUT == "channel_first"
    if PROJ == "fused":
        return _linear(x, wks, PROJ_DTYPE, first).chunk(5, dim=0 if first else 1)
    return [_linear(x, wk, PROJ_DTYPE, first) for wk in wks]


def _proj_weights(w):
    if PROJ == "fused":
        return _weight(torch.cat([w[f"{n}.weight"] for n in _NAMES]), PROJ_DTYPE)
    return [_weight(w[f"{n}.weight"], PROJ_DTYPE) for n in _NAMES]


def _gate(value, gate_logits, mask):
    if INPLACE:
        return value.mul_(mask).mul_(gate_logits.sigmoid_())
    return value * mask * torch.sigmoid(gate_logits)


def _triangle(left, right, out):
    """out[d, i, j] = sum_k left[d, i, k] * right[d, j, k], channel-first [H, N, N] each, in
    TRI_DTYPE, CHUNK channels per batched GEMM."""
    dt = getattr(torch, TRI_DTYPE)
    h = left.shape[0]
    step = CHUNK or h
    for a in range(0, h, step):
        la, ra = left[a : a + step].to(dt), right[a : a + step].to(dt)
        prod = torch.bmm(la, ra.transpose(1, 2))
        out[a : a + step] = prod


def _out_norm_first(t, w, og):
    """LayerNorm over the channel axis of a channel-first [H, rows] tensor, then the out gate."""
    mean = t.mean(0, keepdim=True)
    var = t.var(0, unbiased=False, keepdim=True)
    scale = torch.rsqrt(var + 1e-5)
    if INPLACE:
        t.sub_(mean).mul_(scale)
        t.mul_(w["to_out_norm.weight"][:, None]).add_(w["to_out_norm.bias"][:, None])
        return t.mul_(og)
    t = (t - mean) * scale
    return (t * w["to_out_norm.weight"][:, None] + w["to_out_norm.bias"][:, None]) * og


_STAGES = {"gate": _gate, "norm_first": _out_norm_first}
_COMPILED = {}


def _stage(name):
    if COMPILE and name not in _COMPILED:
        _COMPILED[name] = torch.compile(_STAGES[name], dynamic=True)
    return _COMPILED.get(name, _STAGES[name])


def _blocked(x, mask, w, c, h):
    """The row-blocked pipeline, one batch element at a time: per block of BLOCK rows,
    LayerNorm, the projections and the gating into channel-first [H, N*N] buffers; the triangle
    product per channel; per block again, the output LayerNorm, gate and projection straight
    into the output."""
    b, n = x.shape[0], x.shape[1]
    rows = n * n
    wks = _proj_weights(w)
    wo = _weight(w["to_out.weight"], OUT_DTYPE)
    store = _BF if TRI_DTYPE == "bfloat16" else torch.float32
    first = LAYOUT == "channel_first"
    out = torch.empty(b, rows, c)
    left, right = torch.empty(h, rows, dtype=store), torch.empty(h, rows, dtype=store)
    og_all = torch.empty(h, rows)
    tri = torch.empty(h, n, n, dtype=store)
    for bb in range(b):
        xb, mb = x[bb].view(rows, c), mask[bb].reshape(1, rows)
        for a in range(0, rows, BLOCK):
            e = min(rows, a + BLOCK)
            xn = F.layer_norm(xb[a:e], (c,), w["norm.weight"], w["norm.bias"])
            parts = _project(xn, wks)
            lp, rp, lg, rg, og = parts if first else [p.T for p in parts]
            m = mb[:, a:e]
            left[:, a:e] = _gate(lp, lg, m)
            right[:, a:e] = _gate(rp, rg, m)
            og_all[:, a:e] = og.sigmoid_() if INPLACE else torch.sigmoid(og)
        _triangle(left.view(h, n, n), right.view(h, n, n), tri)
        flat = tri.view(h, rows)
        for a in range(0, rows, BLOCK):
            e = min(rows, a + BLOCK)
            t = F.layer_norm(
                flat[:, a:e].T.float(), (h,), w["to_out_norm.weight"], w["to_out_norm.bias"]
            )
            t = t.mul_(og_all[:, a:e].T) if INPLACE else t * og_all[:, a:e].T
            out[bb, a:e] = _linear(t, wo, OUT_DTYPE, first=False)
    return out.view(b, n, n, c)


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_RETAINED = []


def _retain_freed_memory():
    """Once per process: glibc's heap keeps what is freed (no trim) and serves large blocks
    too (no mmap), so a later allocation reuses pages already faulted in."""
    if _RETAINED:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 62)
        libc.mallopt(_M_MMAP_MAX, 0)
    except OSError:  # not glibc: the system allocator as it is
        pass
    _RETAINED.append(True)


def custom_kernel(data):
    x, mask, w, config = data
    if ALLOC == "retain":
        _retain_freed_memory()
    if THREADS:
        torch.set_num_threads(THREADS)
    c, h = config["dim"], config["hidden_dim"]
    if BLOCK:
        return _blocked(x, mask, w, c, h)
    b, n = x.shape[0], x.shape[1]
    rows = b * n * n
    xn = F.layer_norm(x, (c,), w["norm.weight"], w["norm.bias"]).view(rows, c)
    lp, rp, lg, rg, og = _project(xn, _proj_weights(w))
    del xn
    gate = _stage("gate")
    wo = _weight(w["to_out.weight"], OUT_DTYPE)
    if LAYOUT == "channel_first":
        m = mask.reshape(1, rows)
        left, right = gate(lp, lg, m), gate(rp, rg, m)
        og = og.sigmoid_() if INPLACE else torch.sigmoid(og)
        del lg, rg
        t = torch.empty(h, b, n, n)
        lv, rv = left.view(h, b, n, n), right.view(h, b, n, n)
        for bb in range(b):
            tb = torch.empty(h, n, n)
            _triangle(lv[:, bb], rv[:, bb], tb)
            t[:, bb] = tb
        del left, right
        t = _stage("norm_first")(t.view(h, rows), w, og)
        return _linear(t.T, wo, OUT_DTYPE, first=False).view(b, n, n, c)
    m = mask.reshape(rows, 1)
    left, right = gate(lp, lg, m), gate(rp, rg, m)
    og = torch.sigmoid(og)
    left, right = left.view(b, n, n, h), right.view(b, n, n, h)
    dt = getattr(torch, TRI_DTYPE)
    t = torch.einsum("... i k d, ... j k d -> ... i j d", left.to(dt), right.to(dt)).float()
    t = F.layer_norm(t, (h,), w["to_out_norm.weight"], w["to_out_norm.bias"]) * og.view(b, n, n, h)
    return _linear(t.view(rows, h), wo, OUT_DTYPE, first=False).view(b, n, n, c)
