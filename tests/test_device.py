"""Precision from the hardware: every case of the decision, and what the commands say and record."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from nmt.device import Capabilities, capabilities, choose_precision, resolve_precision
from nmt.evaluate import evaluate_recipe

AVX2 = Capabilities("cpu", "AMD EPYC", "AVX2")
AVX512 = Capabilities("cpu", "Intel Xeon", "AVX512")  # AVX-512 without its BF16 extension
ZEN4 = Capabilities("cpu", "AMD EPYC", "AVX512", avx512_bf16=True)
SAPPHIRE_RAPIDS = Capabilities("cpu", "Intel Xeon", "AVX512", avx512_bf16=True, amx=True)
AMX_ONLY = Capabilities("cpu", "some CPU", "AVX512", amx=True)
ARM = Capabilities("cpu", "aarch64", "DEFAULT")
AMPERE = Capabilities("cuda", "NVIDIA A100", "AVX2", cuda_bf16=True)
TURING = Capabilities("cuda", "Tesla T4", "AVX2", cuda_bf16=False)
MPS = Capabilities("mps", "Apple", "DEFAULT")


@pytest.mark.parametrize("caps, expected", [
    (AVX2, "fp32"), (AVX512, "fp32"), (ARM, "fp32"), (TURING, "fp32"), (MPS, "fp32"),
    (ZEN4, "bf16"), (SAPPHIRE_RAPIDS, "bf16"), (AMX_ONLY, "bf16"), (AMPERE, "bf16"),
])
def test_auto_takes_bf16_only_where_it_is_native(caps, expected):
    precision = choose_precision("auto", caps)
    assert precision.name == expected
    assert precision.requested == "auto" and not precision.emulated
    assert ("has no native bf16" in precision.reason) == (expected == "fp32")


@pytest.mark.parametrize("caps", [AVX2, AVX512, ARM, TURING, MPS])
def test_explicit_bf16_without_bf16_units_runs_emulated(caps):
    precision = choose_precision("bf16", caps)
    assert precision.name == "bf16" and precision.emulated


@pytest.mark.parametrize("caps", [AVX2, ZEN4, AMPERE, TURING])
def test_explicit_choices_are_kept(caps):
    assert choose_precision("fp32", caps).name == "fp32"
    assert not choose_precision("fp32", caps).emulated
    assert choose_precision("bf16", caps).name == "bf16"
    assert choose_precision("bf16", caps).emulated == (not caps.native_bf16)


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError):
        choose_precision("fp16", AVX2)


def test_this_machine_is_described_as_torch_sees_it():
    caps = capabilities(torch.device("cpu"))
    assert caps.cpu_capability == torch.backends.cpu.get_cpu_capability()
    assert caps.avx512_bf16 == torch.cpu._is_avx512_bf16_supported()
    assert caps.amx == torch.cpu._is_amx_tile_supported()


def test_resolve_says_once_and_warns_only_when_emulated():
    lines: list[str] = []
    native = capabilities(torch.device("cpu")).native_bf16
    precision = resolve_precision("bf16", torch.device("cpu"), "train.precision", lines.append)
    assert precision.name == "bf16"
    assert lines[0].startswith("precision bf16")
    warnings = [line for line in lines if line.startswith("warning")]
    if native:
        assert warnings == []
    else:
        assert len(warnings) == 1 and "train.precision" in warnings[0] and "100x" in warnings[0]
    lines.clear()
    resolve_precision("fp32", torch.device("cpu"), "train.precision", lines.append)
    assert lines == ["precision fp32 (asked for)"]


def test_training_and_evaluation_record_the_resolved_precision(trained_exp, capsys):
    """The trained fixture asks for fp32; a recipe's `auto` is resolved and recorded as such."""
    config, exp = trained_exp
    summary = json.loads((exp / "model" / "summary.json").read_text())
    assert summary["precision"]["name"] == "fp32" and summary["precision"]["requested"] == "fp32"
    assert summary["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()

    auto = dataclasses.replace(config, decode=dataclasses.replace(config.decode, precision="auto"))
    evaluate_recipe(auto, exp, beam_size=1)
    record = json.loads((exp / "eval" / "test.json").read_text())
    expected = choose_precision("auto", capabilities(torch.device("cpu")))
    assert record["precision"]["name"] == expected.name
    assert record["precision"]["requested"] == "auto"
    assert record["decode"]["precision"] == "auto"
    assert f"precision {expected.name} (auto:" in capsys.readouterr().err
