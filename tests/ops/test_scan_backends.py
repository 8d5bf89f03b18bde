"""Every scan backend against the `reference` loop: outputs, final states and all gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

from bsmamba2.errors import BSMamba2Error
from bsmamba2.ops import mamba_chunk_scan_combined, scan_torch_compile
from bsmamba2.ops.scan_reference import scan_reference

from devices import DEVICES, ON_CUDA, TRITON_SHAPE, on_devices

KERNEL_BACKENDS = ("torch", "triton", "cuda")      # the backends the fused kernels and the model run on
GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


def make_inputs(seqlen, ngroups=1, dstate=16, initial=False, D_per_channel=False, gate=True, batch=2, nheads=4,
                headdim=8, dtype=torch.float32, seed=0):
    """Random scan inputs with Mamba2-like ranges: A in [-16, -1], softplus(dt + dt_bias) mostly 0.01..2."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    inputs = {
        "x": randn(batch, seqlen, nheads, headdim),
        "dt": randn(batch, seqlen, nheads) - 1.0,
        "A": -torch.exp(torch.rand(nheads, generator=g) * math.log(16.0)),
        "B": randn(batch, seqlen, ngroups, dstate, scale=dstate ** -0.5),
        "C": randn(batch, seqlen, ngroups, dstate),
        "D": torch.randn((nheads, headdim) if D_per_channel else (nheads,), generator=g),
        "z": randn(batch, seqlen, nheads, headdim) if gate else None,
        "dt_bias": torch.randn(nheads, generator=g) * 0.5,
        "initial_states": torch.randn(batch, nheads, headdim, dstate, generator=g) if initial else None,
    }
    return {name: t.requires_grad_() if t is not None else None for name, t in inputs.items()}


def run_scan(inputs, backend, chunk_size=16, final_in_loss=True, device="cpu"):
    """Outputs, final states and the gradients of a fixed random projection of both, on the CPU whatever `device`
    the scan ran on."""
    leaves = {name: t.detach().to(device).requires_grad_() for name, t in inputs.items() if t is not None}
    args = {name: leaves.get(name) for name in inputs}
    if backend == "reference":
        y, final = scan_reference(args["x"], args["dt"], args["A"], args["B"], args["C"], chunk_size,
                                  D=args["D"], z=args["z"], dt_bias=args["dt_bias"],
                                  initial_states=args["initial_states"], dt_softplus=True, return_final_states=True)
    else:
        y, final = mamba_chunk_scan_combined(args["x"], args["dt"], args["A"], args["B"], args["C"], chunk_size,
                                             D=args["D"], z=args["z"], dt_bias=args["dt_bias"],
                                             initial_states=args["initial_states"], dt_softplus=True,
                                             return_final_states=True, backend=backend)
    g = torch.Generator().manual_seed(99)
    loss = (y.float() * torch.randn(y.shape, generator=g).to(device)).sum()
    if final_in_loss:
        loss = loss + (final.float() * torch.randn(final.shape, generator=g).to(device)).sum()
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[name] for name in names])
    return y.detach().cpu(), final.detach().cpu(), {name: grad.cpu() for name, grad in zip(names, grads)}


def assert_close(actual, expected, rtol, what):
    """|actual − expected| ≤ rtol · max|expected| (a relative tolerance that is meaningful near zeros)."""
    actual, expected = actual.float(), expected.float()
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    scale = expected.abs().max().clamp_min(1e-12)
    error = ((actual - expected).abs().max() / scale).item()
    assert error <= rtol, f"{what}: relative error {error:.2e} > {rtol:.0e}"


def fp32_tolerance(backend, device):
    """1e-4 relative; mamba_ssm's Triton kernels multiply float32 in TF32 (10-bit mantissa) on CUDA."""
    return 5e-3 if (backend, device) == ("triton", "cuda") else 1e-4


def assert_backend_matches_reference(backend, inputs, chunk_size, rtol=1e-4, final_in_loss=True, device="cpu"):
    y, final, grads = run_scan(inputs, backend, chunk_size, final_in_loss, device)
    y_ref, final_ref, grads_ref = run_scan(inputs, "reference", chunk_size, final_in_loss)
    assert_close(y, y_ref, rtol, f"{backend}: y")
    assert_close(final, final_ref, rtol, f"{backend}: final states")
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], rtol, f"{backend}: d{name}")


# (seqlen, ngroups, dstate, initial states, D per channel, gate, chunk size): odd lengths, one chunk, several
# chunks with a ragged end, ngroups 1 and > 1, d_state 16 and 128.
CASES = [
    (1, 1, 16, False, False, True, 16),
    (63, 2, 16, True, True, False, 16),
    (65, 1, 128, False, False, True, 16),
    (65, 2, 16, True, False, True, 64),
    (37, 2, 128, True, True, True, 16),
    (40, 1, 16, False, True, True, 8),
]
CASE_IDS = [f"L{c[0]}-g{c[1]}-n{c[2]}{'-init' if c[3] else ''}{'-Dhp' if c[4] else ''}-Q{c[6]}" for c in CASES]


def backend_cases():
    """(backend, case, device) for every backend, case and device: selective_scan_fn (`cuda`) takes no initial
    states, and `triton` runs on CUDA at the paper's shape only (devices.py says why)."""
    return [param for backend in KERNEL_BACKENDS for case, case_id in zip(CASES, CASE_IDS)
            if not (backend == "cuda" and case[3])
            for param in on_devices(backend, case, id=f"{backend}-{case_id}", skip_on_cuda=backend == "triton")]


@pytest.mark.parametrize("backend,case,device", backend_cases())
def test_backend_matches_reference(backend, case, device, backend_on):
    """On the CPU: `torch`, and the `cuda` and `triton` adapters on the stand-in kernels; on CUDA: the real thing.
    selective_scan_fn gives no gradient through its last state, so for `cuda` the loss only reads y."""
    backend_on(device, backend)
    seqlen, ngroups, dstate, initial, D_per_channel, gate, chunk_size = case
    inputs = make_inputs(seqlen, ngroups, dstate, initial, D_per_channel, gate)
    assert_backend_matches_reference(backend, inputs, chunk_size, rtol=fp32_tolerance(backend, device),
                                     final_in_loss=backend != "cuda", device=device)


@pytest.mark.parametrize("backend", [pytest.param(backend, marks=ON_CUDA, id=f"{backend}-gpu")
                                     for backend in KERNEL_BACKENDS])
def test_backend_matches_reference_at_the_paper_mixer_shape(backend, backend_on):
    """16 heads × 64, d_state 128, ngroups 1, chunk 128, over three chunks with a ragged end."""
    backend_on("cuda", backend)
    inputs = make_inputs(257, ngroups=1, dstate=TRITON_SHAPE["dstate"], batch=1, nheads=16,
                         headdim=TRITON_SHAPE["headdim"])
    assert_backend_matches_reference(backend, inputs, TRITON_SHAPE["chunk_size"], fp32_tolerance(backend, "cuda"),
                                     final_in_loss=backend != "cuda", device="cuda")


def test_cuda_adapter_refuses_initial_states(kernel_standins):
    inputs = make_inputs(8, initial=True)
    with pytest.raises(BSMamba2Error, match="initial_states"):
        run_scan(inputs, "cuda")


def test_torch_backend_long_fast_decaying_sequence_is_finite_and_exact(fresh_backend_log):
    """801 steps (the paper's 8 s), 13 chunks of 62, decays down to 2^-2000 within a chunk: no inf/NaN anywhere."""
    inputs = make_inputs(801, ngroups=1, dstate=16, batch=1, nheads=2, headdim=4)
    with torch.no_grad():
        inputs["dt"].add_(2.0)                    # softplus(dt) up to ~5 per step, A down to -16
    assert_backend_matches_reference("torch", inputs, chunk_size=64)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backend_bfloat16_within_tolerance(backend, device, backend_on):
    """bf16 inputs against the float32 reference on the same values: y and gradients come back in bf16, whose
    8-bit mantissa sets the tolerance: 2 %, and 5 % for the fused kernels on CUDA, which keep some intermediates in
    bf16 (and selective_scan_fn takes dt in bf16). Two groups of one head of the paper's shape, over two chunks."""
    backend_on(device, backend)
    inputs = make_inputs(130, ngroups=2, dstate=TRITON_SHAPE["dstate"], initial=backend != "cuda", batch=1,
                         nheads=2, headdim=TRITON_SHAPE["headdim"], dtype=torch.bfloat16)
    as_float = {name: t.detach().float().requires_grad_() if t is not None else None for name, t in inputs.items()}
    final_in_loss, chunk_size = backend != "cuda", TRITON_SHAPE["chunk_size"]
    y, final, grads = run_scan(inputs, backend, chunk_size, final_in_loss=final_in_loss, device=device)
    y_ref, final_ref, grads_ref = run_scan(as_float, "reference", chunk_size, final_in_loss=final_in_loss)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    rtol = 5e-2 if device == "cuda" and backend != "torch" else 2e-2
    assert_close(y, y_ref, rtol, "bf16 y")
    assert_close(final, final_ref, rtol, "bf16 final states")
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], rtol, f"bf16 d{name}")


@pytest.mark.slow
def test_torch_compile_backend_matches_eager(monkeypatch, fresh_backend_log):
    """The torch+compile path traced by torch.compile. Inductor's C++ build costs about a minute per shape on this
    machine, so the test compiles with "aot_eager" — the same Dynamo + AOTAutograd tracing of our function, forward
    and backward — and leaves code generation to torch's own tests (the benchmark runs the real thing)."""
    monkeypatch.setattr(scan_torch_compile, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(scan_torch_compile, "_compiled", None)
    monkeypatch.setattr(scan_torch_compile, "_compile_failed", False)
    torch._dynamo.reset()
    inputs = make_inputs(37, ngroups=2, dstate=16, initial=True, D_per_channel=True)
    assert_backend_matches_reference("torch+compile", inputs, chunk_size=16)
    assert not scan_torch_compile._compile_failed


def test_torch_compile_failure_falls_back_to_eager_once(monkeypatch, caplog, fresh_backend_log):
    def broken_compile(function, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(scan_torch_compile, "_compiled", None)
    monkeypatch.setattr(scan_torch_compile, "_compile_failed", False)
    inputs = make_inputs(20)
    with caplog.at_level("WARNING", logger="bsmamba2"):
        assert_backend_matches_reference("torch+compile", inputs, chunk_size=8)
        run_scan(inputs, "torch+compile", chunk_size=8)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "no C++ compiler here" in warnings[0] and "eager" in warnings[0]


def test_reference_matches_closed_form_in_float64():
    """The reference loop against the scan written out as sums of products (no recurrence, no cumsum):
    y_t = Σ_{s≤t} (C_t·B_s) Π_{s<k≤t} e^{dt_k A} dt_s x_s + Π_{k≤t} e^{dt_k A} C_t·h_0 + D x_t, gated by silu(z)."""
    g = torch.Generator().manual_seed(3)
    batch, seqlen, nheads, headdim, ngroups, dstate = 1, 6, 4, 2, 2, 3
    x = torch.randn(batch, seqlen, nheads, headdim, generator=g, dtype=torch.float64)
    dt_raw = torch.randn(batch, seqlen, nheads, generator=g, dtype=torch.float64)
    A = -torch.rand(nheads, generator=g, dtype=torch.float64) * 3
    B = torch.randn(batch, seqlen, ngroups, dstate, generator=g, dtype=torch.float64)
    C = torch.randn(batch, seqlen, ngroups, dstate, generator=g, dtype=torch.float64)
    D = torch.randn(nheads, generator=g, dtype=torch.float64)
    z = torch.randn(batch, seqlen, nheads, headdim, generator=g, dtype=torch.float64)
    dt_bias = torch.randn(nheads, generator=g, dtype=torch.float64)
    h0 = torch.randn(batch, nheads, headdim, dstate, generator=g, dtype=torch.float64)

    y, final = scan_reference(x, dt_raw, A, B, C, 4, D=D, z=z, dt_bias=dt_bias, initial_states=h0,
                              dt_softplus=True, return_final_states=True)

    dt = [[math.log1p(math.exp(dt_raw[0, t, h].item() + dt_bias[h].item())) for h in range(nheads)]
          for t in range(seqlen)]
    expected = torch.zeros(seqlen, nheads, headdim, dtype=torch.float64)
    expected_final = torch.zeros(nheads, headdim, dstate, dtype=torch.float64)
    for h in range(nheads):
        group = h // (nheads // ngroups)

        def decay(first, last):  # Π_{first ≤ k ≤ last} exp(dt_k A_h)
            return math.prod(math.exp(dt[k][h] * A[h].item()) for k in range(first, last + 1))

        for t in range(seqlen):
            for s in range(t + 1):
                expected[t, h] += (C[0, t, group] @ B[0, s, group]) * decay(s + 1, t) * dt[s][h] * x[0, s, h]
            expected[t, h] += decay(0, t) * (h0[0, h] @ C[0, t, group]) + D[h] * x[0, t, h]
            expected[t, h] *= F.silu(z[0, t, h])
        for s in range(seqlen):
            expected_final[h] += decay(s + 1, seqlen - 1) * dt[s][h] * torch.outer(x[0, s, h], B[0, s, group])
        expected_final[h] += decay(0, seqlen - 1) * h0[0, h]
    torch.testing.assert_close(y[0], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final[0], expected_final, rtol=1e-12, atol=1e-12)


def test_shape_errors_name_the_argument():
    inputs = make_inputs(10)
    with pytest.raises(BSMamba2Error, match="dt must have shape"):
        mamba_chunk_scan_combined(inputs["x"], inputs["dt"][:, :5], inputs["A"], inputs["B"], inputs["C"], 8)
    with pytest.raises(BSMamba2Error, match="D must be"):
        mamba_chunk_scan_combined(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], 8,
                                  D=torch.ones(3))


@pytest.mark.parametrize("backend,device", [param for backend in ("torch", "torch+compile", "cuda", "triton")
                                            for param in on_devices(backend, id=backend,
                                                                    skip_on_cuda=backend == "triton")])
def test_mamba2_mixer_same_under_every_backend(backend, device, monkeypatch, backend_on):
    """The whole mixer (projection, causal conv, scan, gated norm), forward and backward, against `reference` on
    the CPU (`triton` on CUDA: in test_backends_in_model.py, at the paper's shape)."""
    from bsmamba2.models.mamba2 import Mamba2

    backend_on(device, backend)
    monkeypatch.setattr(scan_torch_compile, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(scan_torch_compile, "_compiled", None)
    torch._dynamo.reset()
    torch.manual_seed(0)
    mixer = Mamba2(16, d_state=8, expand=2, headdim=8, ngroups=2, chunk_size=4)
    u = torch.randn(2, 11, 16)
    results = {}
    for name, where in ((backend, device), ("reference", "cpu")):
        mixer.to(where).scan_backend = name
        mixer.zero_grad()
        leaf = u.to(where).clone().requires_grad_()
        out = mixer(leaf)
        (out * torch.linspace(-1, 1, out.numel(), device=where).view(out.shape)).sum().backward()
        results[name] = [t.cpu() for t in [out.detach(), leaf.grad] + [p.grad.clone() for p in mixer.parameters()]]
    for got, expected in zip(results[backend], results["reference"]):
        assert_close(got, expected, fp32_tolerance(backend, device), f"{backend} mixer")


def test_torch_backend_ignores_autocast(fresh_backend_log):
    """Under bf16 autocast the scan still computes in float32: same outputs and gradients as without."""
    inputs = make_inputs(30, ngroups=2, initial=True)
    expected = run_scan(inputs, "torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run_scan(inputs, "torch")
    assert got[0].dtype == torch.float32
    for a, b in zip([got[0], got[1], *got[2].values()], [expected[0], expected[1], *expected[2].values()]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
