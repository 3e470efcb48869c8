"""The LoRA Functions against float64 references and against PEFT's own modules.

Shapes are odd on purpose (9x7 tokens, 41 in, 23 out, r 5; MLP 41 -> 67) so that no power-of-two
accident hides an indexing bug. Errors are relative Frobenius norms, ``|got - ref| / |ref|``, with one
tolerance per dtype: fp32 is near round-off, bf16 and fp16 are bounded by their mantissas (8 and 11
bits) after sums of a few dozen terms.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

from kubetune_kernels.lora import LoraWeights, dequantize, from_peft, lora_linear, lora_mlp, lora_qkv

pytestmark = pytest.mark.trainer

TOKENS, D_IN, D_OUT, R, D_FF = (9, 7), 41, 23, 5, 67
SCALE = 1.75

# name: (base dtype, adapter dtype, autocast dtype or None, tolerance)
CONFIGS = {
    "fp32": (torch.float32, torch.float32, None, 2e-6),
    "bf16": (torch.bfloat16, torch.float32, None, 1.5e-2),
    "bf16-adapters-bf16": (torch.bfloat16, torch.bfloat16, None, 1.5e-2),
    "fp16": (torch.float16, torch.float32, None, 3e-3),
    "autocast-bf16": (torch.float32, torch.float32, torch.bfloat16, 1.5e-2),
    "autocast-fp16": (torch.float32, torch.float32, torch.float16, 3e-3),
}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    return float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref))


def make_weights(d_in, d_out, base_dtype, adapter_dtype, *, bias=True, dropout=0.0, seed=0) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    return LoraWeights(
        weight=(torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(base_dtype),
        bias=(torch.randn(d_out, generator=g) * 0.1).to(base_dtype) if bias else None,
        a=(torch.randn(R, d_in, generator=g) / d_in**0.5).to(adapter_dtype).requires_grad_(),
        b=(torch.randn(d_out, R, generator=g) / R**0.5).to(adapter_dtype).requires_grad_(),
        scale=SCALE,
        dropout=dropout,
    )


def leaf64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().requires_grad_()


class Ref64:
    """A float64 copy of one LoRA layer; ``noise`` is the dropout keep-mask already divided by (1-p)."""

    def __init__(self, w: LoraWeights):
        self.w = w
        self.W = dequantize(w, torch.float64)
        self.bias = None if w.bias is None else w.bias.double()
        self.a, self.b = leaf64(w.a), leaf64(w.b)

    def __call__(self, x, noise=None):
        xd = x if noise is None else x * noise.double()
        y = x @ self.W.T + self.w.scale * (xd @ self.a.T) @ self.b.T
        return y if self.bias is None else y + self.bias


def autocast(dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False)


def dropout_noise(shape, p, dtype, seed):
    """What nn.Dropout multiplies by on CPU after ``torch.manual_seed(seed)``: mask / (1 - p)."""
    torch.manual_seed(seed)
    return F.dropout(torch.ones(shape, dtype=dtype), p, training=True)


def check_grads(pairs, tol):
    for name, got, ref in pairs:
        assert got is not None, name
        assert rel_err(got, ref) < tol, (name, rel_err(got, ref))


# ------------------------------------------------------------------------------------ lora_linear


@pytest.mark.parametrize("config", list(CONFIGS))
def test_lora_linear_matches_float64(config):
    base_dtype, adapter_dtype, ac, tol = CONFIGS[config]
    w = make_weights(D_IN, D_OUT, base_dtype, adapter_dtype)
    x = torch.randn(*TOKENS, D_IN).to(base_dtype).requires_grad_()
    grad = torch.randn(*TOKENS, D_OUT)
    with autocast(ac):
        y = lora_linear(x, w, training=True)
    y.backward(grad.to(y.dtype))

    ref, x64 = Ref64(w), leaf64(x)
    y64 = ref(x64)
    y64.backward(grad.double())
    assert y.dtype == (ac or base_dtype)
    assert rel_err(y, y64) < tol
    assert x.grad.dtype == x.dtype and w.a.grad.dtype == adapter_dtype and w.b.grad.dtype == adapter_dtype
    check_grads([("x", x.grad, x64.grad), ("A", w.a.grad, ref.a.grad), ("B", w.b.grad, ref.b.grad)], 2 * tol)
    assert w.weight.grad is None and w.bias.grad is None


def test_lora_linear_never_grads_frozen_base_even_if_asked():
    w = make_weights(D_IN, D_OUT, torch.float32, torch.float32)
    x = torch.randn(*TOKENS, D_IN, requires_grad=True)
    lora_linear(x, w, training=True).sum().backward()
    assert not w.weight.requires_grad and w.weight.grad is None and w.bias.grad is None


def test_lora_linear_dropout_uses_nn_dropout_mask():
    p, seed = 0.3, 1234
    w = make_weights(D_IN, D_OUT, torch.float32, torch.float32, dropout=p)
    x = torch.randn(*TOKENS, D_IN, requires_grad=True)
    grad = torch.randn(*TOKENS, D_OUT)
    torch.manual_seed(seed)
    y = lora_linear(x, w, training=True)
    y.backward(grad)

    noise = dropout_noise(x.shape, p, torch.float32, seed)
    assert 0.1 < float((noise == 0).float().mean()) < 0.5  # the mask really drops something
    ref, x64 = Ref64(w), leaf64(x)
    y64 = ref(x64, noise)
    y64.backward(grad.double())
    tol = CONFIGS["fp32"][3]
    assert rel_err(y, y64) < tol
    check_grads([("x", x.grad, x64.grad), ("A", w.a.grad, ref.a.grad), ("B", w.b.grad, ref.b.grad)], tol)
    assert rel_err(y, ref(x64.detach())) > 1e-3  # and differs from no dropout at all


def test_eval_mode_ignores_dropout():
    w = make_weights(D_IN, D_OUT, torch.float32, torch.float32, dropout=0.5)
    w0 = make_weights(D_IN, D_OUT, torch.float32, torch.float32, dropout=0.0)
    x = torch.randn(*TOKENS, D_IN)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert torch.equal(lora_linear(x, w, training=False), lora_linear(x, w0, training=False))
    assert torch.equal(before, torch.get_rng_state())  # no mask was drawn


# --------------------------------------------------------------------------------------- lora_mlp


def mlp_weights(base_dtype, adapter_dtype, dropout=0.0):
    return (
        make_weights(D_IN, D_FF, base_dtype, adapter_dtype, bias=False, dropout=dropout, seed=1),
        make_weights(D_IN, D_FF, base_dtype, adapter_dtype, bias=False, dropout=dropout, seed=2),
        make_weights(D_FF, D_IN, base_dtype, adapter_dtype, bias=False, dropout=dropout, seed=3),
    )


def mlp64(refs, x64, noises=(None, None, None)):
    gate, up, down = refs
    return down(F.silu(gate(x64, noises[0])) * up(x64, noises[1]), noises[2])


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_lora_mlp_matches_float64(config, p):
    base_dtype, adapter_dtype, ac, tol = CONFIGS[config]
    ws = mlp_weights(base_dtype, adapter_dtype, dropout=p)
    x = torch.randn(*TOKENS, D_IN).to(base_dtype).requires_grad_()
    grad = torch.randn(*TOKENS, D_IN)
    torch.manual_seed(7)
    with autocast(ac):
        y = lora_mlp(x, *ws, training=True)
    y.backward(grad.to(y.dtype))

    noises = (None, None, None)
    if p:  # nn.Dropout draws gate's, up's, then down's mask, each in lora_A's dtype
        torch.manual_seed(7)
        shapes = [(*TOKENS, D_IN), (*TOKENS, D_IN), (*TOKENS, D_FF)]
        noises = tuple(F.dropout(torch.ones(s, dtype=adapter_dtype), p, training=True) for s in shapes)
    refs, x64 = [Ref64(w) for w in ws], leaf64(x)
    y64 = mlp64(refs, x64, noises)
    y64.backward(grad.double())
    assert y.dtype == (ac or base_dtype)
    assert rel_err(y, y64) < tol
    pairs = [("x", x.grad, x64.grad)]
    for name, w, ref in zip(("gate", "up", "down"), ws, refs, strict=True):
        pairs += [(f"{name}.A", w.a.grad, ref.a.grad), (f"{name}.B", w.b.grad, ref.b.grad)]
        assert w.a.grad.dtype == adapter_dtype and w.weight.grad is None
    check_grads(pairs, 2 * tol)


# --------------------------------------------------------------------------------------- lora_qkv


@pytest.mark.parametrize("config", ["fp32", "bf16", "autocast-bf16", "fp16"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_lora_qkv_matches_float64(config, p):
    base_dtype, adapter_dtype, ac, tol = CONFIGS[config]
    outs = (D_OUT, 11, 11)
    ws = [
        make_weights(D_IN, o, base_dtype, adapter_dtype, bias=i == 0, dropout=p, seed=10 + i)
        for i, o in enumerate(outs)
    ]
    x = torch.randn(*TOKENS, D_IN).to(base_dtype).requires_grad_()
    grads = [torch.randn(*TOKENS, o) for o in outs]
    torch.manual_seed(5)
    with autocast(ac):
        ys = lora_qkv(x, *ws, training=True)
    torch.autograd.backward(ys, [g.to(y.dtype) for g, y in zip(grads, ys, strict=True)])

    noises = (None, None, None)
    if p:  # q's mask, then k's, then v's: PEFT's call order
        torch.manual_seed(5)
        noises = tuple(F.dropout(torch.ones(x.shape, dtype=adapter_dtype), p, training=True) for _ in range(3))
    refs, x64 = [Ref64(w) for w in ws], leaf64(x)
    ys64 = [ref(x64, noise) for ref, noise in zip(refs, noises, strict=True)]
    torch.autograd.backward(ys64, [g.double() for g in grads])
    pairs = [("x", x.grad, x64.grad)]
    for name, y, y64, w, ref in zip("qkv", ys, ys64, ws, refs, strict=True):
        assert rel_err(y, y64) < tol, name
        pairs += [(f"{name}.A", w.a.grad, ref.a.grad), (f"{name}.B", w.b.grad, ref.b.grad)]
    check_grads(pairs, 2 * tol)


@pytest.mark.parametrize("kernel", ["linear", "mlp", "qkv"])
def test_input_that_needs_no_grad_still_trains_the_adapters(kernel):
    """The first decoder layer's input may not require grad: A and B must still get theirs."""
    x = torch.randn(*TOKENS, D_IN)
    if kernel == "linear":
        ws = [make_weights(D_IN, D_OUT, torch.float32, torch.float32)]
        ys, refs = [lora_linear(x, ws[0], training=True)], [Ref64(ws[0])]
        ys64 = [refs[0](x.double())]
    elif kernel == "mlp":
        ws = list(mlp_weights(torch.float32, torch.float32))
        ys, refs = [lora_mlp(x, *ws, training=True)], [Ref64(w) for w in ws]
        ys64 = [mlp64(refs, x.double())]
    else:
        ws = [make_weights(D_IN, D_OUT, torch.float32, torch.float32, seed=30 + i) for i in range(3)]
        ys, refs = list(lora_qkv(x, *ws, training=True)), [Ref64(w) for w in ws]
        ys64 = [ref(x.double()) for ref in refs]
    sum(y.square().sum() for y in ys).backward()
    sum(y.square().sum() for y in ys64).backward()
    assert x.grad is None
    for w, ref in zip(ws, refs, strict=True):
        check_grads([("A", w.a.grad, ref.a.grad), ("B", w.b.grad, ref.b.grad)], CONFIGS["fp32"][3])


def test_lora_qkv_with_an_unused_output():
    ws = [make_weights(D_IN, D_OUT, torch.float32, torch.float32, seed=20 + i) for i in range(3)]
    x = torch.randn(*TOKENS, D_IN, requires_grad=True)
    q, k, _ = lora_qkv(x, *ws, training=True)
    (q.sum() + k.sum()).backward()
    ref = leaf64(x)
    (Ref64(ws[0])(ref).sum() + Ref64(ws[1])(ref).sum()).backward()
    assert rel_err(x.grad, ref.grad) < 1e-5
    assert ws[2].a.grad is None and ws[2].b.grad is None


# ------------------------------------------------------------------------------------------- PEFT


def tiny_peft_llama(dtype=torch.float32, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=40,
        intermediate_size=D_FF,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config).to(dtype)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = LoraConfig(r=R, lora_alpha=2 * R, target_modules=targets, **lora)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # PEFT starts B at zero, which would hide every bug in the adapter path
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    return peft_model


def peft_layer(peft_model):
    return peft_model.base_model.model.model.layers[0]


def read(module):
    w, reason = from_peft(module)
    assert w is not None, reason
    assert reason == ""
    return w


@pytest.mark.parametrize(
    "dtype, ac, tol",
    [(torch.float32, None, 1e-6), (torch.bfloat16, None, 0.0), (torch.float32, torch.bfloat16, 1e-2)],
    ids=["fp32", "bf16-model-fp32-adapters", "autocast-bf16"],
)
def test_from_peft_equals_peft_forward(dtype, ac, tol):
    """tol 0: bit for bit. A bf16 model with PEFT's fp32 adapters runs PEFT's own casts and adds one by
    one; with a single dtype the scale and the add ride in the GEMM (addmm), so the last bit may differ."""
    model = tiny_peft_llama(dtype).eval()
    layer = peft_layer(model)
    mlp, attn = layer.mlp, layer.self_attn
    assert attn.q_proj.lora_A["default"].weight.dtype == torch.float32  # PEFT keeps adapters in fp32

    def same(got, ref):
        assert got.dtype == ref.dtype == (ac or dtype)
        return torch.equal(got, ref) if tol == 0 else rel_err(got, ref) < tol

    x = torch.randn(3, 5, 40).to(dtype)
    with torch.no_grad(), autocast(ac):
        assert same(lora_mlp(x, read(mlp.gate_proj), read(mlp.up_proj), read(mlp.down_proj), False), mlp(x))
        ours = lora_qkv(x, read(attn.q_proj), read(attn.k_proj), read(attn.v_proj), False)
        for got, proj in zip(ours, (attn.q_proj, attn.k_proj, attn.v_proj), strict=True):
            assert same(got, proj(x))
        assert same(lora_linear(x, read(attn.o_proj), False), attn.o_proj(x))


def test_from_peft_training_with_dropout_equals_peft_and_its_grads():
    model = tiny_peft_llama(lora_dropout=0.25).train()
    mlp = peft_layer(model).mlp
    ws = [read(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    assert ws[0].dropout == 0.25 and ws[0].scale == 2.0
    x = torch.randn(3, 5, 40)
    grad = torch.randn(3, 5, 40)

    def run(fn):
        xx = x.clone().requires_grad_()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(99)
        fn(xx).backward(grad)
        return [xx.grad] + [t.grad.clone() for w in ws for t in (w.a, w.b)]

    peft = run(mlp)
    ours = run(lambda xx: lora_mlp(xx, *ws, training=True))
    for got, ref in zip(ours, peft, strict=True):
        assert rel_err(got, ref) < 1e-5


def test_from_peft_reasons():
    from peft.tuners.lora import Linear as LoraLinear

    model = tiny_peft_llama()
    q = peft_layer(model).self_attn.q_proj
    assert isinstance(q, LoraLinear)
    assert from_peft(torch.nn.Linear(3, 4)) == (None, "not a LoRA layer (Linear)")
    with model.disable_adapter():
        assert from_peft(q) == (None, "adapters disabled")
    model.merge_adapter()
    assert from_peft(q) == (None, "adapter merged into the base weight")
    model.unmerge_adapter()
    assert from_peft(q, adapter="other") == (None, "adapter 'other' not active")
    assert read(q).a is q.lora_A["default"].weight

    from peft import LoraConfig

    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "other"])
    assert from_peft(q) == (None, "more than one active adapter")

    dora = peft_layer(tiny_peft_llama(use_dora=True)).self_attn.q_proj
    assert from_peft(dora) == (None, "DoRA adapter")


def test_from_peft_rejects_other_base_layers():
    import bitsandbytes as bnb

    model = tiny_peft_llama()
    q = peft_layer(model).self_attn.q_proj
    q.base_layer = bnb.nn.Linear8bitLt(40, 40, has_fp16_weights=False)
    assert from_peft(q) == (None, "8-bit base layer unsupported")

    class ScaledLinear(torch.nn.Linear):  # a Linear whose forward is not x Wᵀ + b
        def forward(self, x):
            return 2 * super().forward(x)

    q.base_layer = ScaledLinear(40, 40).requires_grad_(False)
    assert from_peft(q) == (None, "base layer ScaledLinear unsupported")
    q.base_layer = torch.nn.Linear(40, 40)  # trainable: our backward would drop its gradient
    assert from_peft(q) == (None, "base weight is trainable")


# ------------------------------------------------------------------------------------------ 4-bit


def peft_4bit_linear(dtype=torch.float32):
    """A PEFT LoRA layer over a bitsandbytes NF4 Linear4bit, quantised on CPU."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    lin = bnb.nn.Linear4bit(D_IN, D_OUT, bias=True, compute_dtype=dtype, quant_type="nf4")
    dense = torch.randn(D_OUT, D_IN) / D_IN**0.5
    lin.weight = bnb.nn.Params4bit(dense.clone(), requires_grad=False, quant_type="nf4")
    with torch.no_grad():
        lin.bias.normal_(0.0, 0.1)
    toy = torch.nn.Sequential()
    toy.add_module("proj", lin.to("cpu"))  # Params4bit quantises when moved
    toy.is_loaded_in_4bit = True
    peft_model = get_peft_model(toy, LoraConfig(r=R, lora_alpha=2 * R, target_modules=["proj"]))
    proj = peft_model.base_model.model.proj
    with torch.no_grad():
        proj.lora_B["default"].weight.normal_(0.0, 0.2)
    return proj, dense


def test_4bit_lora_linear_matches_dequantised_float64_and_peft():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proj, dense = peft_4bit_linear()
    proj.train()
    w = read(proj)
    assert w.quant_state is not None and w.weight.dtype == torch.uint8
    x = torch.randn(*TOKENS, D_IN, requires_grad=True)
    grad = torch.randn(*TOKENS, D_OUT)
    y = lora_linear(x, w, training=True)
    y.backward(grad)

    ref, x64 = Ref64(w), leaf64(x)
    y64 = ref(x64)
    y64.backward(grad.double())
    tol = 1e-5
    assert rel_err(y, y64) < tol
    check_grads([("x", x.grad, x64.grad), ("A", w.a.grad, ref.a.grad), ("B", w.b.grad, ref.b.grad)], tol)
    # the reference is the NF4 weight (a few percent off the float one it came from), not the float one
    assert 0.02 < rel_err(dequantize(w, torch.float32), dense) < 0.2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_y = proj(x)
    assert rel_err(y, peft_y) < tol


# ---------------------------------------------------------------------------------- saved tensors


def saved_bytes(fn, frozen_and_params):
    """Bytes of distinct storages autograd keeps for backward, parameters excluded (they live anyway)."""
    skip = {t.untyped_storage().data_ptr() for t in frozen_and_params}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(kept.values()), out


@pytest.mark.parametrize("ac", [None, torch.bfloat16])
def test_lora_mlp_saves_clearly_less_than_peft(ac):
    model = tiny_peft_llama().train()
    mlp = peft_layer(model).mlp
    ws = [read(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    params = list(model.parameters())
    x = torch.randn(3, 5, 40, requires_grad=True)
    with autocast(ac):
        peft, _ = saved_bytes(lambda: mlp(x), params)
        ours, y = saved_bytes(lambda: lora_mlp(x, *ws, training=True), params)
    n, act = 15, (ac or torch.float32).itemsize
    # x (fp32), e and g (compute dtype), three [N, r] products (compute dtype); nothing else
    assert ours == n * 40 * 4 + 2 * n * D_FF * act + 3 * n * R * act
    assert ours < 0.65 * peft, (ours, peft)
    y.float().sum().backward()


def test_lora_linear_saves_input_and_xa_only_4bit_included():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = read(peft_4bit_linear()[0])
    x = torch.randn(*TOKENS, D_IN, requires_grad=True)
    n = TOKENS[0] * TOKENS[1]
    got, _ = saved_bytes(lambda: lora_linear(x, w, training=True), [w.weight, w.a, w.b])
    assert got == n * D_IN * 4 + n * R * 4  # never the dequantised weight
    wd = LoraWeights(w.weight, w.bias, w.a, w.b, w.scale, 0.5, w.quant_state)
    got, _ = saved_bytes(lambda: lora_linear(x, wd, training=True), [w.weight, w.a, w.b])
    assert got == n * D_IN * 4 + n * D_IN * 1 + n * R * 4  # dropped input, one-byte mask, x·Aᵀ


# -------------------------------------------------------------------------------------- compile


def test_torch_compile_fullgraph_aot_eager():
    """A decoder-ish block of all three Functions, dropout on: one graph, same values and grads as eager."""
    gate, up, down = mlp_weights(torch.float32, torch.float32)
    lin = make_weights(D_IN, D_OUT, torch.float32, torch.float32)
    qkv = [make_weights(D_IN, D_OUT, torch.float32, torch.float32, seed=40 + i) for i in range(3)]

    def block(x, la, lb, ga, gb, ua, ub, da, db, qa, qb, ka, kb, va, vb):
        y = lora_linear(x, LoraWeights(lin.weight, lin.bias, la, lb, SCALE, 0.1), training=True)
        m = lora_mlp(
            x,
            LoraWeights(gate.weight, None, ga, gb, SCALE, 0.1),
            LoraWeights(up.weight, None, ua, ub, SCALE, 0.1),
            LoraWeights(down.weight, None, da, db, SCALE, 0.1),
            training=True,
        )
        pairs = zip(qkv, (qa, ka, va), (qb, kb, vb), strict=True)
        ws = [LoraWeights(w.weight, w.bias, a, b, SCALE) for w, a, b in pairs]
        q, k, v = lora_qkv(x, *ws, training=True)
        return y.sum(-1) + m.sum(-1) + (q * k).sum(-1) + v.sum(-1)

    leaves = [lin.a, lin.b, gate.a, gate.b, up.a, up.b, down.a, down.b] + [t for w in qkv for t in (w.a, w.b)]
    x = torch.randn(*TOKENS, D_IN)

    def grads(fn):
        xs = x.clone().requires_grad_()
        args = [t.detach().clone().requires_grad_() for t in leaves]
        torch.manual_seed(11)
        out = fn(xs, *args)
        out.backward(torch.ones_like(out))
        return [out, xs.grad] + [t.grad for t in args]

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    for got, ref in zip(grads(compiled), grads(block), strict=True):
        assert rel_err(got, ref) < 1e-6
    assert counters["stats"]["unique_graphs"] == 1  # traced, as one graph, not run eagerly


def test_torch_compile_fullgraph_aot_eager_4bit():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = read(peft_4bit_linear()[0])
    x = torch.randn(*TOKENS, D_IN)

    def grads(fn):
        xs = x.clone().requires_grad_()
        w.a.grad = w.b.grad = None
        out = fn(xs)
        out.square().sum().backward()
        return [out, xs.grad, w.a.grad, w.b.grad]

    torch._dynamo.reset()
    compiled = torch.compile(lambda xs: lora_linear(xs, w, training=True), backend="aot_eager", fullgraph=True)
    for got, ref in zip(grads(compiled), grads(lambda xs: lora_linear(xs, w, training=True)), strict=True):
        assert rel_err(got, ref) < 1e-6
    # fullgraph=True raises on any break; no graph count here, because bitsandbytes' CPU backend
    # torch.compiles its own dequantise helper behind its registered op, and those graphs count too.
