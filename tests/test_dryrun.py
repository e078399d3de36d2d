"""The dry run: the pipeline's own __call__ on the meta device, checked against the real thing.

The live-bytes counter, the fused-attention footprint and the CPU twins are checked on hand-made
operations; the traced call sequence of every tiny family is checked against the calls accelerate's
real model-offload hooks see when the same pipeline really runs on the CPU, and model offload's
residency against those hooks' own chain.
"""

from __future__ import annotations

import pytest
import torch

import tiny_families
import tiny_pipelines
from pipefit.tools.dryrun import _FusedAttention, _LiveBytes, trace_pipeline
from pipefit.tools.measure import measure_components
from pipefit.tools.plan import Plan
from pipefit.tools.strategies import Weights, group_offload, offload

MiB = 2**20
TINY = {
    "flux": dict(height=32, width=32), "sdxl": dict(height=32, width=32), "wan": dict(height=16, width=16, num_frames=9),
    **{name: {k: v for k, v in kw.items() if k in ("height", "width", "num_frames")}
       for name, kw in tiny_families.CALL_KWARGS.items()},
}  # fmt: skip


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, device="meta", dtype=dtype)


def test_live_bytes_follow_each_tensor_until_its_last_reference_dies():
    with torch.no_grad(), _LiveBytes() as live:
        a = _meta(MiB // 2)  # 1 MiB
        b = a * 2  # 2 MiB live
        view = b[::2]  # a view: no new bytes
        del a, b  # `view` keeps b's storage
        c = view + 1  # 0.5 MiB more
        del view
        assert live.current == c.numel() * 2
    assert live.peak == 2 * MiB
    assert live.current == c.numel() * 2


def test_attention_counts_the_fused_kernels_footprint_not_the_score_matrix():
    q = k = v = _meta(1, 8, 4096, 64)
    with torch.no_grad(), _FusedAttention() as attention, _LiveBytes() as live:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert out.shape == (1, 8, 4096, 64)
    scores = 8 * 4096 * 4096 * 2
    assert q.numel() * 2 <= live.peak < scores / 8  # output and a float32 logsumexp, far below S x S
    assert attention.flops == 4 * 8 * 4096 * 4096 * 64
    # a head wider than the fused kernels take (the SD VAE's 512) runs the math path: scores and softmax
    wide = _meta(1, 1, 1024, 512)
    with torch.no_grad(), _FusedAttention(), _LiveBytes() as live:
        torch.nn.functional.scaled_dot_product_attention(wide, wide, wide)
    assert live.peak >= 2 * 1024 * 1024 * 2


def test_a_repeated_op_gets_new_tensors_of_its_first_outputs_layout_and_views_stay_views():
    with torch.no_grad(), _LiveBytes() as live:
        ids = torch.empty(4, 8, device="meta", dtype=torch.int64)
        assert (ids * 2).dtype == torch.int64 and (ids * 2).dtype == torch.int64
        assert (ids * 2.0).dtype == torch.float32  # the argument's type is part of what the op is
        wide = _meta(8, 4).t()
        assert (wide + 1).stride() == (wide + 1).stride() == wide.stride()  # the input's layout carried on
        flat = wide.contiguous()
        held = live.current
        views = [torch.ops.aten._unsafe_view(flat, [32]) for _ in range(2)]  # views its schema does not declare
        assert all(v.shape == (32,) for v in views)
        assert live.current == held  # no new bytes, the second time too


def test_the_repeated_op_shortcut_leaves_every_trace_as_it_was(monkeypatch):
    """The dry run makes a repeated op's outputs from its first layout (most of a meta op's time is its
    Python shape function): each allocation, workspace, weight use and call stays what running every op gives,
    for a denoiser's blocks, three text encoders, a tiled image decode and a video decode."""
    from pipefit.tools import dryrun

    workloads = {"sd3.5-medium": {"height": 256, "width": 256}, "qwen-image": {"height": 320, "width": 320},
                 "wan2.1-t2v-1.3b": {"height": 64, "width": 64, "frames": 5}}  # fmt: skip
    for model, shape in workloads.items():
        fast = trace_pipeline(f"builtin:{model}", steps=2, cache=False, **shape)
        with monkeypatch.context() as patch:
            patch.setattr(dryrun, "_op_key", lambda *args: None)
            every = trace_pipeline(f"builtin:{model}", steps=2, cache=False, **shape)
        assert fast.allocations == every.allocations and len(fast.allocations) > 1000, model
        assert fast.model_dump(exclude={"seconds"}) == every.model_dump(exclude={"seconds"}), model


def test_small_tensors_have_real_values_for_data_dependent_code():
    with torch.no_grad(), _LiveBytes():
        mask = torch.tensor([[1, 1, 1, 0, 0]]).to("meta")
        assert bool(mask.bool().any()) and not bool(mask.bool().all())
        assert mask.sum(dim=1).tolist() == [3]
        assert torch.nonzero(mask[0]).shape == (3, 1)
        states = _meta(1, 5, 4096)
        assert states[mask.bool()].shape == (3, 4096)  # boolean indexing of a large tensor: shape from the mask
        timesteps = torch.linspace(1000, 0, 4).to("meta")
        assert [int(t >= 500) for t in timesteps] == [1, 1, 0, 0]


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-families")
    folders = {kind: tiny_pipelines.write(kind, root / kind) for kind in tiny_pipelines.KINDS}
    folders.update({name: tiny_families.write(name, root / name) for name in tiny_families.FAMILIES})
    return folders


def _real_hook_events(pipe, kwargs: dict, steps: int) -> tuple[list[str], dict[str, str | None]]:
    """The components accelerate's real model-offload hooks see, in call order, and each hook's
    predecessor in the chain (the one its pre-forward offloads)."""
    pipe.enable_model_cpu_offload(device="cpu")
    names = {id(module): name for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}
    calls: list[str] = []
    previous: dict[str, str | None] = {}
    for hook in pipe._all_hooks:
        name = names[id(hook.model)]
        prev = hook.hook.prev_module_hook
        previous[name] = names[id(prev.model)] if prev is not None else None
        pre_forward = hook.hook.pre_forward

        def recorded(module, *args, _pre=pre_forward, _name=name, **kw):
            calls.append(_name)
            return _pre(module, *args, **kw)

        hook.hook.pre_forward = recorded
    pipe.set_progress_bar_config(disable=True)
    pipe(prompt="a photo of a cat", num_inference_steps=steps, **kwargs)
    return calls, previous


@pytest.mark.parametrize("name", [*tiny_pipelines.KINDS, *tiny_families.FAMILIES])
def test_the_traced_calls_are_the_ones_the_real_hooks_see(name, tiny_folders):
    """Run each tiny pipeline for real under accelerate's model-offload hooks and dry-run it on meta:
    the same components in the same order (encoders called twice for CFG, both Wan 2.2 experts, the
    decode), and model offload's predicted residency is what the hooks' own chain implies."""
    steps = 3
    kwargs = dict(tiny_families.CALL_KWARGS.get(name, {}), **TINY[name])
    build = tiny_pipelines.build if name in tiny_pipelines.KINDS else tiny_families.build
    real_calls, previous = _real_hook_events(build(name), kwargs, steps)

    trace = trace_pipeline(str(tiny_folders[name]), height=kwargs["height"], width=kwargs["width"],
                           frames=kwargs.get("num_frames"), steps=steps, dtype="float32")  # fmt: skip
    assert not trace.warnings
    traced = [c.component for c in trace.calls]
    assert traced == real_calls

    # residency: replay the real chain (each hook offloads its predecessor) and compare
    m = measure_components(str(tiny_folders[name]), dtype="float32")
    weights = Weights.of(Plan(offload="model"), m)
    on: set[str] = set()
    expected = []
    for component in real_calls:
        on.discard(previous.get(component) or "")
        on.add(component)
        expected.append(sum(weights.bytes[c] for c in on))
    assert offload.resident(Plan(offload="model"), trace, weights) == expected


def test_sd3_keeps_t5_on_the_gpu_while_the_clips_come_back_under_model_offload():
    """SD3 encodes the negative prompt after the prompt: CLIP-L and CLIP-G return while T5-XXL is still
    on the device (the 12.46 GB an H200 measured, not 'one component at a time')."""
    m = measure_components("builtin:sd3.5-medium")
    trace = trace_pipeline("builtin:sd3.5-medium", height=1024, width=1024, steps=2)
    order = [c.component for c in trace.calls if c.step is None and c.method == "forward"]
    assert order == ["text_encoder", "text_encoder_2", "text_encoder_3"] * 2
    weights = Weights.of(Plan(offload="model"), m)
    resident = offload.resident(Plan(offload="model"), trace, weights)
    second_clip_g = [i for i, c in enumerate(trace.calls) if c.component == "text_encoder_2"][1]
    t5, clip_g = weights.bytes["text_encoder_3"], weights.bytes["text_encoder_2"]
    assert resident[second_clip_g] == t5 + clip_g
    assert max(resident) > max(weights.bytes.values())


def test_guidance_comes_from_the_pipeline():
    """Flux runs no CFG (one transformer call per step); SDXL batches it (2 per forward); Wan runs it as
    a second pass; guidance_scale 1 turns Wan's off."""
    flux = trace_pipeline("builtin:flux1-dev", height=256, width=256, steps=2)
    assert flux.per_step("transformer") == 1 and flux.calls[-2].inputs["hidden_states"][0] == 1
    sdxl = trace_pipeline("builtin:sdxl-base", height=256, width=256, steps=2)
    assert sdxl.per_step("unet") == 1 and sdxl.denoiser_calls("unet")[0].inputs["sample"][0] == 2
    wan = trace_pipeline("builtin:wan2.1-t2v-1.3b", height=128, width=128, frames=5, steps=2)
    assert wan.per_step("transformer") == 2
    off = trace_pipeline("builtin:wan2.1-t2v-1.3b", height=128, width=128, frames=5, steps=2, guidance_scale=1.0)
    assert off.per_step("transformer") == 1


def test_a_trace_is_cached_per_workload():
    first = trace_pipeline("builtin:flux1-dev", height=256, width=256, steps=2)
    again = trace_pipeline("builtin:flux1-dev", height=256, width=256, steps=2)
    other = trace_pipeline("builtin:flux1-dev", height=512, width=256, steps=2)
    assert not first.from_cache and again.from_cache and not other.from_cache
    assert again.calls == first.calls
    assert other.denoiser_calls("transformer")[0].peak_bytes > first.denoiser_calls("transformer")[0].peak_bytes


def _group_bytes(group) -> int:
    tensors = [*(t for m in group.modules for t in (*m.parameters(), *m.buffers())), *(group.parameters or []),
               *(group.buffers or [])]  # fmt: skip
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


GROUP_PLANS = {
    "block_1": Plan(offload="group_block", group={"num_blocks_per_group": 1}),
    "block_2": Plan(offload="group_block", group={"num_blocks_per_group": 2}),
    "leaf": Plan(offload="group_leaf"),
}


@pytest.mark.parametrize("plan_name", GROUP_PLANS)
@pytest.mark.parametrize("kind", tiny_pipelines.KINDS)
def test_group_offload_residency_matches_the_real_hooks(kind, plan_name, tiny_folders, monkeypatch):
    """Run each tiny pipeline under diffusers' real group offloading (onloading to the CPU) and record
    the bytes of the groups it has onloaded while each component runs: the prediction is never
    below it, and for block level it is exact for the encoders and the denoiser."""
    from diffusers.hooks import group_offloading

    plan = GROUP_PLANS[plan_name]
    pipe = tiny_pipelines.build(kind)
    onloaded: dict[int, int] = {}
    running: list[str] = []
    seen: dict[str, int] = {}
    onload, offload = group_offloading.ModuleGroup.onload_, group_offloading.ModuleGroup.offload_

    def recording_onload(group):
        onloaded[id(group)] = _group_bytes(group)
        if running:
            seen[running[-1]] = max(seen.get(running[-1], 0), sum(onloaded.values()))
        return onload(group)

    def recording_offload(group):
        onloaded.pop(id(group), None)
        return offload(group)

    monkeypatch.setattr(group_offloading.ModuleGroup, "onload_", recording_onload)
    monkeypatch.setattr(group_offloading.ModuleGroup, "offload_", recording_offload)
    settings = plan.group_settings
    pipe.enable_group_offload(
        onload_device=torch.device("cpu"), offload_type="block_level" if plan.offload == "group_block" else "leaf_level",
        **({"num_blocks_per_group": settings.num_blocks_per_group} if plan.offload == "group_block" else {}),
    )  # fmt: skip
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            method = "decode" if name == "vae" else "forward"
            original = getattr(module, method)

            def running_as(*args, _original=original, _name=name, **kwargs):
                running.append(_name)
                try:
                    return _original(*args, **kwargs)
                finally:
                    running.pop()

            setattr(module, method, running_as)
    kwargs = {k: v for k, v in TINY[kind].items()}
    pipe.set_progress_bar_config(disable=True)
    pipe(prompt="a photo of a cat", num_inference_steps=2, **kwargs)

    m = measure_components(str(tiny_folders[kind]), dtype="float32")
    trace = trace_pipeline(str(tiny_folders[kind]), height=kwargs["height"], width=kwargs["width"],
                           frames=kwargs.get("num_frames"), steps=2, dtype="float32")  # fmt: skip
    predicted: dict[str, int] = {}
    for call, on in zip(trace.calls, group_offload.resident(plan, trace, Weights.of(plan, m))):
        predicted[call.component] = max(predicted.get(call.component, 0), on)
    assert set(seen) == set(predicted)
    for name, real in seen.items():
        assert predicted[name] >= real, (name, predicted[name], real)
        if plan.offload == "group_block" and name != "vae":
            assert predicted[name] == real, name


def test_a_side_stream_keeps_its_largest_moment_for_the_rest_of_the_call(tiny_folders):
    """With streams the copies come from the side stream's own pool, which the main stream cannot reuse:
    once the text encoders were streamed, the VAE decode (resident) still has their largest moment beside
    it. Without streams nothing stays behind."""
    kwargs = TINY["flux"]
    m = measure_components(str(tiny_folders["flux"]), dtype="float32")
    trace = trace_pipeline(str(tiny_folders["flux"]), height=kwargs["height"], width=kwargs["width"], steps=2,
                           dtype="float32")  # fmt: skip
    streamed = Plan(offload="group_leaf", group={"use_stream": True, "exclude": ["vae"]})
    plain = Plan(offload="group_leaf", group={"exclude": ["vae"]})
    weights = Weights.of(streamed, m)
    vae_call = next(i for i, c in enumerate(trace.calls) if c.component == "vae")
    before = {c.component for c in trace.calls[:vae_call]}
    pool = max(weights.leaf_pair(n) for n in before)
    assert group_offload.resident(streamed, trace, weights)[vae_call] == weights.bytes["vae"] + pool
    assert group_offload.resident(plain, trace, weights)[vae_call] == weights.bytes["vae"]
