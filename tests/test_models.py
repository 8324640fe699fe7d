"""Model loading (errors included) and other HF families through the packed path: Qwen2 and Mistral with
sliding windows, Qwen3, checked against stock transformers on tiny random-weight models."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from engine.config import EngineConfig
from engine.cpu_linear import ONEDNN, CpuLinear, prepack_linears, use_cpu_linears
from engine.cpu_modules import CpuDecoderLayer, CpuRMSNorm, CpuSelfAttention, GateUpMLP, use_cpu_modules
from engine.llm_engine import LLMEngine
from engine.model_loader import ModelLoadError, check_config, layer_windows, load_model
from engine.sampling_params import SamplingParams
from tests.conftest import natural_text

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, vocab_size=49152)
FAMILIES = {
    "qwen2": dict(model_type="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "mistral": dict(model_type="mistral", sliding_window=6),
    "qwen3": dict(model_type="qwen3", head_dim=16),
}


def _save_tiny(tmp_path, family: str, loaded) -> str:
    kw = dict(FAMILIES[family])
    config = AutoConfig.for_model(kw.pop("model_type"), **TINY, **kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_family_matches_hf(tmp_path, loaded, family):
    path = _save_tiny(tmp_path, family, loaded)
    tiny = load_model(path, progress=False)
    windows = layer_windows(tiny.config)
    if family != "qwen3":
        assert any(w is not None for w in windows), windows
    engine = LLMEngine(EngineConfig(num_kv_blocks=64, max_num_batched_tokens=16), loaded=tiny)
    prompts = [loaded.tokenizer.encode(natural_text(n, n)) for n in (1, 2, 3)]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
    ids = [engine.add_request(p, sp) for p in prompts]
    logprobs = {i: [] for i in ids}
    while engine.has_unfinished_requests():
        for out in engine.step():
            logprobs[out.request_id] += [lp.logprob for lp in out.logprobs]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    for p, rid in zip(prompts, ids):
        outs, tokens = [], list(p)
        with torch.inference_mode():
            for _ in range(6):
                lp = ref(torch.tensor([tokens])).logits[0, -1].log_softmax(-1)
                tok = int(lp.argmax())
                outs.append(float(lp[tok]))
                tokens.append(tok)
        assert torch.allclose(torch.tensor(logprobs[rid]), torch.tensor(outs), atol=1e-4)
    assert engine.usage().used == 0


def test_missing_path_and_non_model_inputs(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nothing"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelLoadError, match="without config.json"):
        load_model(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError, match="unsupported architecture GPT2LMHeadModel"):
        load_model(str(tmp_path))


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "RoPE scaling type 'dynamic'"),
        ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8,
                           "original_max_position_embeddings": 256}}, "RoPE scaling type 'longrope'"),
        ({"final_logit_softcapping": 30.0}, "soft-capping"),
    ],
)
def test_configs_the_engine_cannot_run(extra, message):
    config = AutoConfig.for_model("llama", **TINY, architectures=["LlamaForCausalLM"])
    if "rope_scaling" in extra:
        config.rope_parameters = dict(extra["rope_scaling"], rope_theta=10000.0)
    else:
        config.final_logit_softcapping = extra["final_logit_softcapping"]
    with pytest.raises(ModelLoadError, match=message):
        check_config(config)


def test_max_model_len_must_fit_the_pool(loaded):
    with pytest.raises(ValueError, match="largest length that fits is 1584"):
        LLMEngine(EngineConfig(num_kv_blocks=100, max_model_len=4096), loaded=loaded)


@pytest.mark.parametrize("bias", [True, False])
def test_cpu_linear_matches_nn_linear(bias):
    """Up to `max_rows` rows through longserve's kernel (every count of rows in a pass, and two passes over a weight
    tile), more through oneDNN's matmul: `nn.Linear`'s products to float32 rounding, any leading shape, strided
    input."""
    torch.manual_seed(0)
    # 100 inputs: not a multiple of the kernel's 16-wide steps; 83 outputs: a last tile, and columns left over after
    # every pass's weight rows
    linear = torch.nn.Linear(100, 83, bias=bias)
    model = torch.nn.Sequential(linear)
    assert use_cpu_linears(model) == 1 and isinstance(model[0], CpuLinear)
    assert model[0].weight is linear.weight
    assert model[0].max_rows == 16
    rows = [torch.randn(m, 100) for m in range(1, model[0].max_rows + 2)]
    inputs = (*rows, torch.randn(1, 3, 100), torch.randn(3, 7, 100), *(torch.randn(m, 200)[:, ::2] for m in (5, 40)))
    for x in inputs:
        with torch.inference_mode():
            torch.testing.assert_close(model(x), linear(x), atol=1e-5, rtol=1e-5)
    # With oneDNN's copy of the weight for the rows past max_rows: the same products.
    assert prepack_linears(model) == (linear.weight.nbytes if ONEDNN else 0)
    for x in inputs:
        with torch.inference_mode():
            torch.testing.assert_close(model(x), linear(x), atol=1e-5, rtol=1e-5)
    if ONEDNN:  # the copy is what multiplies those rows: with the plain weight zeroed, they still get the products
        x = torch.randn(40, 100)
        with torch.no_grad():
            want = linear(x)
            linear.weight.zero_()
            torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
            assert not model(x[:3]).sub(linear.bias if bias else 0).any()


def test_prepacked_copies_leave_out_the_output_embedding(loaded):
    model = loaded.model
    linears = [m for m in model.modules() if isinstance(m, CpuLinear)]
    head = model.get_output_embeddings()
    assert head in linears and head.packed is None and head.weight is model.get_input_embeddings().weight
    assert all(m.packed is not None for m in linears if m is not head) == ONEDNN


@pytest.mark.parametrize("bias", [True, False])
def test_cpu_modules_match_the_hf_modules(bias):
    """The norm (alone and after a residual add) and the MLP with its gate and up products as one, to float32
    rounding; the MLP through longserve's kernel (up to 16 rows) and torch's matmul."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=100, intermediate_size=72, num_attention_heads=5, mlp_bias=bias)
    model = torch.nn.ModuleDict({"norm": LlamaRMSNorm(100, 1e-5), "mlp": LlamaMLP(config)})
    torch.nn.init.normal_(model.norm.weight)
    norm, mlp = model.norm, model.mlp  # the HF modules, left out of the model and unchanged
    assert use_cpu_modules(model) == 3  # the norm, the MLP, and its down product as a CpuLinear
    assert isinstance(model.norm, CpuRMSNorm) and isinstance(model.mlp, GateUpMLP)
    assert isinstance(model.mlp.gate_up_proj, CpuLinear) and isinstance(model.mlp.down_proj, CpuLinear)
    assert type(mlp.down_proj) is torch.nn.Linear
    for x in (torch.randn(1, 100), torch.randn(1, 5, 100), torch.randn(9, 100), torch.randn(17, 100)):
        with torch.inference_mode():
            torch.testing.assert_close(model.norm(x), norm(x), atol=1e-5, rtol=1e-5)
            residual = torch.randn_like(x)
            h, normed = model.norm.add_and_norm(x, residual)
            assert torch.equal(h, residual + x)
            torch.testing.assert_close(normed, norm(residual + x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model.mlp(x), mlp(x), atol=1e-5, rtol=1e-5)


def test_silu_and_mul_kernel_matches_torch():
    """`silu(gate) * up` over rows of gate values then up values, to float32 rounding, at the exponential's limits
    (large magnitudes of either sign, zeros, subnormals) too."""
    from attention_backends.kernels import cpu_ext

    torch.manual_seed(0)
    gate_up = torch.randn(2, 7, 2 * 37) * 4  # 37: not a multiple of the vector width
    gate_up[0, 0, :9] = torch.tensor([0.0, -0.0, 100.0, -100.0, 1e-40, -1e-40, 88.0, -88.0, -200.0])
    gate, up = gate_up.chunk(2, dim=-1)
    out = cpu_ext.load().silu_and_mul(gate_up)
    assert out.shape == (2, 7, 37)
    torch.testing.assert_close(out, F.silu(gate) * up, atol=1e-6, rtol=1e-6)


def test_rotary_kernel_matches_hf():
    """In place on the query and key heads of a fused QKV product (strided views), values left as they were."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from attention_backends.kernels import cpu_ext

    torch.manual_seed(0)
    T, D = 5, 64
    qkv = torch.randn(T, 4 + 2 + 2, D)
    angles = torch.randn(T, D // 2)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    q_ref, k_ref = apply_rotary_pos_emb(qkv[:, :4].transpose(0, 1), qkv[:, 4:6].transpose(0, 1), cos, sin,
                                        unsqueeze_dim=0)
    v = qkv[:, 6:].clone()
    cpu_ext.load().rotary_inplace(qkv[:, :4], qkv[:, 4:6], cos, sin)
    torch.testing.assert_close(qkv[:, :4], q_ref.transpose(0, 1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(qkv[:, 4:6], k_ref.transpose(0, 1), atol=1e-6, rtol=1e-6)
    assert torch.equal(qkv[:, 6:], v)
    with pytest.raises(RuntimeError, match="must match cos and sin"):
        cpu_ext.load().rotary_inplace(qkv[:4, :4], qkv[:4, 4:6], cos, sin)


def test_loaded_cpu_model_runs_cpu_modules(loaded):
    layers = loaded.config.num_hidden_layers
    modules = list(loaded.model.modules())
    # q+k+v, o, gate+up, down per layer, and lm_head
    assert sum(isinstance(m, CpuLinear) for m in modules) == 4 * layers + 1
    assert sum(isinstance(m, CpuRMSNorm) for m in modules) == 2 * layers + 1
    for kind in (GateUpMLP, CpuSelfAttention, CpuDecoderLayer):
        assert sum(isinstance(m, kind) for m in modules) == layers
    assert not any(type(m) is torch.nn.Linear for m in modules)
    assert not any(type(m).__module__.startswith("transformers.")
                   and type(m).__name__.endswith(("RMSNorm", "MLP", "Attention", "DecoderLayer")) for m in modules)
    # the tied lm_head reads the embedding's weight, not a copy of it
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.get_input_embeddings().weight.data_ptr()
