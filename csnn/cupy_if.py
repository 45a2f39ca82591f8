"""Our CuPy kernels for the tutorial's multi-step IF neuron (backend: cupy, `-cupy`).

SpikingJelly 2 has no CuPy code; the tutorial's `-cupy` selected SpikingJelly
1's CuPy kernels. These are ours, with the same formulas as the compiled CPU
kernels in `csnn/model.py` (threshold 1, hard reset to 0, ATan surrogate):

    forward, t = 0..T-1:   H = V + X[t];  S = (H >= 1);  V = (1 - S) * H
    backward, t = T-1..0:  g = dL/dS[t] * sg(H) + g' * ((1 - S) - H * sg(H)),
                           sg(H) = (a/2) / (1 + (pi/2 * a * (H - 1))^2),  dL/dX[t] = g

One thread per neuron walks the T steps. Inputs and spikes are float32 or
float16 (AMP); the membrane potential and the saved H are float32. The kernels
are compiled by CuPy's NVRTC on first use, for whatever CuPy build is installed
(cupy-cuda12x, cupy-cuda13x): the code only says `import cupy`. They run on
PyTorch's current stream and take its tensors by address, so no synchronisation is
needed and they can be captured in a CUDA graph. The first layer's input, one image
repeated at every step, is read once per neuron, not copied T times.
"""
from __future__ import annotations

import functools
import sys

import torch

THREADS = 256

_SOURCE = r"""
// float16 travels as its 16 bits, converted by PTX: no header needed, whatever the CuPy build.
typedef unsigned short half_bits;
__device__ __forceinline__ float load(const float x) { return x; }
__device__ __forceinline__ float load(const half_bits x) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x)); return f; }
__device__ __forceinline__ void store(float* p, const float v) { *p = v; }
__device__ __forceinline__ void store(half_bits* p, const float v) {
    half_bits h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v)); *p = h; }

// x_step: 0 when x is one input repeated at every step (the first layer's, CSNN.forward),
// else M; sum_over_t: grad_x is then that one input's gradient, summed over the steps.
extern "C" __global__ void csnn_if_forward_SUFFIX(const SCALAR* __restrict__ x, SCALAR* __restrict__ s,
        float* __restrict__ h_seq, float* __restrict__ v_last, const int T, const long long M, const long long x_step) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= M) return;
    float v = 0.0f;
    for (int t = 0; t < T; ++t) {
        const long long k = (long long)t * M + i;
        const float h = v + load(x[t * x_step + i]);
        const float spike = h >= 1.0f ? 1.0f : 0.0f;
        store(s + k, spike);
        if (h_seq) h_seq[k] = h;
        v = (1.0f - spike) * h;
    }
    v_last[i] = v;
}

extern "C" __global__ void csnn_if_backward_SUFFIX(const SCALAR* __restrict__ grad_s, const float* __restrict__ h_seq,
        SCALAR* __restrict__ grad_x, const float alpha, const int T, const long long M, const int sum_over_t) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= M) return;
    const float half_pi_alpha = 1.5707963267948966f * alpha;
    float carry = 0.0f, total = 0.0f;
    for (int t = T - 1; t >= 0; --t) {
        const long long k = (long long)t * M + i;
        const float h = h_seq[k];
        const float z = (h - 1.0f) * half_pi_alpha;
        const float sg = 0.5f * alpha / (1.0f + z * z);
        const float spike = h >= 1.0f ? 1.0f : 0.0f;
        const float g = load(grad_s[k]) * sg + carry * ((1.0f - spike) - h * sg);
        if (sum_over_t) total += g; else store(grad_x + k, g);
        carry = g;
    }
    if (sum_over_t) store(grad_x + i, total);
}
"""

_TYPES = {torch.float32: ("float", "f32"), torch.float16: ("half_bits", "f16")}


INSTALL = "pip install -e '.[cupy]' (cupy-cuda13x, for torch's CUDA 13; README, GPU section)"
COMPILE_ARCH = "sm_75"  # the oldest GPU architecture CUDA 13 compiles for; the check needs no GPU
OPTIONS = ("-std=c++14", "--fmad=false")  # --fmad=false: no contraction to FMA, as SpikingJelly's Triton kernel
                                          # (enable_fp_fusion=False), so both round alike


def available(gpu: bool = True) -> str | None:
    """None when the cupy backend can run here, else why not (for the error message): CuPy
    importable, our kernels compiled by its NVRTC (compile_error), and, with `gpu`, a CUDA GPU."""
    try:
        import cupy  # noqa: F401
    except ImportError as e:
        return f"CuPy is not importable ({e}); install it with {INSTALL}"
    error = compile_error()
    if error:
        return error
    if gpu and not torch.cuda.is_available():
        return "it needs a CUDA GPU and this machine has none (torch.cuda.is_available() is False)"
    return None


@functools.cache
def compile_error(source: str = _SOURCE) -> str | None:
    """Compile our kernels (float32 and float16) with CuPy's NVRTC for COMPILE_ARCH, which needs no
    GPU: None if they compile, else why not (NVRTC missing or of another CUDA than this CuPy's, or
    a compile error). A CuPy that cannot compile fails here, at a study's validation, rather than
    in the first step of every trial."""
    try:
        import cupy  # noqa: F401 - first: a CuPy that does not import says so here
        from cupy_backends.cuda.libs import nvrtc

        for scalar, suffix in _TYPES.values():
            prog = nvrtc.createProgram(source.replace("SCALAR", scalar).replace("SUFFIX", suffix), "csnn_if.cu", (), ())
            try:
                try:
                    nvrtc.compileProgram(prog, (*OPTIONS, f"-arch={COMPILE_ARCH}"))
                except nvrtc.NVRTCError as e:
                    log = nvrtc.getProgramLog(prog).strip().splitlines()
                    raise RuntimeError(f"{e}: {'; '.join(log[:3])}") from None
            finally:
                nvrtc.destroyProgram(prog)
    except Exception as e:  # noqa: BLE001 - a missing library raises anything from ImportError to OSError
        version = getattr(sys.modules.get("cupy"), "__version__", "")
        return (f"CuPy {version} cannot compile our kernels ({type(e).__name__}: "
                f"{(str(e).strip().splitlines() or [''])[0][:300]}); install the CuPy for torch's CUDA "
                f"{torch.version.cuda}: {INSTALL}")
    return None


@functools.cache
def _kernels(dtype: torch.dtype):
    import cupy

    scalar, suffix = _TYPES[dtype]
    module = cupy.RawModule(code=_SOURCE.replace("SCALAR", scalar).replace("SUFFIX", suffix), options=OPTIONS)
    return module.get_function(f"csnn_if_forward_{suffix}"), module.get_function(f"csnn_if_backward_{suffix}")


def _ptr(t: torch.Tensor | None):
    """A tensor as the kernel's pointer argument: its address, no DLPack exchange (which
    would make CuPy's default stream wait on torch's, and cannot be captured in a CUDA graph)."""
    import cupy

    return cupy.uint64(0 if t is None else t.data_ptr())


def _launch(kernel, device: torch.device, m: int, args) -> None:
    """On torch's current stream (the capturing one, inside a CUDA graph capture)."""
    import cupy

    if m == 0:  # an empty grid is a launch error
        return
    with cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream):
        kernel(((m + THREADS - 1) // THREADS,), (THREADS,), args)


def forward(x: torch.Tensor, T: int, keep_h: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """x [T, M], or [1, M] for one input repeated at each of the T steps (float32/float16,
    contiguous, CUDA) -> spikes [T, M] (x's dtype), H [T, M] float32 or None, final V [M] float32."""
    import cupy

    m = x.shape[1]
    assert x.is_contiguous() and x.shape[0] in (1, T), x.shape
    spikes = torch.empty((T, m), dtype=x.dtype, device=x.device)
    h = torch.empty((T, m), dtype=torch.float32, device=x.device) if keep_h else None
    v = torch.empty(m, dtype=torch.float32, device=x.device)
    fwd, _ = _kernels(x.dtype)
    _launch(fwd, x.device, m, (_ptr(x), _ptr(spikes), _ptr(h), _ptr(v), cupy.int32(T), cupy.int64(m),
                               cupy.int64(0 if x.shape[0] == 1 < T else m)))
    return spikes, h, v


def backward(grad_s: torch.Tensor, h: torch.Tensor, alpha: float, repeated: bool) -> torch.Tensor:
    """dL/dX from dL/dS [T, M] and H: [T, M], or [1, M] summed over the steps when `repeated`."""
    import cupy

    T, m = h.shape
    grad_x = torch.empty((1 if repeated else T, m), dtype=grad_s.dtype, device=h.device)
    _, bwd = _kernels(grad_s.dtype)
    _launch(bwd, h.device, m, (_ptr(grad_s), _ptr(h), _ptr(grad_x), cupy.float32(alpha), cupy.int32(T),
                               cupy.int64(m), cupy.int32(repeated)))
    return grad_x


class CupyIF(torch.autograd.Function):
    """Multi-step IF over x [T, M] (or [1, M] repeated T times); returns (spikes [T, M], final V).
    Gradient flows to x only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, T: int, alpha: float):
        spikes, h, v = forward(x, T, keep_h=True)
        ctx.save_for_backward(h)
        ctx.alpha, ctx.repeated = alpha, x.shape[0] == 1 < T
        ctx.mark_non_differentiable(v)
        return spikes, v

    @staticmethod
    def backward(ctx, grad_s, grad_v):
        (h,) = ctx.saved_tensors
        return backward(grad_s.contiguous(), h, ctx.alpha, ctx.repeated), None, None
