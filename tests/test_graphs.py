"""CUDA graphs for LiteSeg's training step: the CPU-side pieces (when they apply, prompt padding, the
learning rate read without the device). The graphs themselves are tested in tests/test_cuda.py."""

from __future__ import annotations

import pytest
import torch

from defectseg import lite
from defectseg.training import TrainConfig, _current_lr, _padded_prompts, _uses_graphs

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize("flag,scratch,device,world,amp,expected", [
    (True, True, CUDA, 1, torch.bfloat16, True),
    (True, True, CUDA, 1, None, True),  # fp32
    (False, True, CUDA, 1, torch.bfloat16, False),  # the default: off
    (True, False, CUDA, 1, torch.bfloat16, False),  # CLIPSeg's decoder on cached features
    (True, True, CPU, 1, torch.bfloat16, False),
    (True, True, CUDA, 2, torch.bfloat16, False),  # DDP
    (True, True, CUDA, 1, torch.float16, False),  # the loss scaler decides on the host
])
def test_when_the_step_is_a_cuda_graph(flag, scratch, device, world, amp, expected):
    assert TrainConfig().cuda_graphs is False
    assert _uses_graphs(TrainConfig(cuda_graphs=flag), device, world, amp, scratch) is expected


def test_padding_prompts_changes_no_conditioning():
    """LiteSeg's prompt encoder gives the same vectors for prompts padded to the tokenizer's full length
    (what a recorded step takes) as for the batch's own length."""
    torch.manual_seed(0)
    model, processor = lite.build("lite-tiny")
    model.eval()
    tokens = dict(processor.tokenizer(["segment crack", "segment taping area", "wall crack"]))
    padded = _padded_prompts({**tokens, "pixel_values": torch.zeros(3)}, processor.tokenizer.max_length)
    assert padded["input_ids"].shape == (3, processor.tokenizer.max_length) > tokens["input_ids"].shape
    assert torch.equal(padded["pixel_values"], torch.zeros(3))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_prompts(padded["input_ids"], padded["attention_mask"]),
                                   model.encode_prompts(tokens["input_ids"], tokens["attention_mask"]),
                                   rtol=1e-6, atol=1e-6)


def test_the_learning_rate_is_read_from_the_schedule(processed, tmp_path):
    """What metrics.csv records as an epoch's learning rate equals the optimizer's, step after step,
    without reading it from the optimizer (a device tensor under CUDA graphs)."""
    from defectseg.training import _set_up

    run = _set_up(TrainConfig(data=str(processed), model="lite-tiny", out=str(tmp_path / "run"), batch_size=4,
                              device="cpu", epochs=2, warmup=0.5), resume=False)
    for _ in range(6):
        assert _current_lr(run) == pytest.approx(run.optimizer.param_groups[0]["lr"], rel=1e-12)
        run.optimizer.step()
        run.scheduler.step()
