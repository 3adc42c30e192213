"""Complexity scripts: every registry model on CPU, units kept apart, totals checked against published numbers."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

import complexity_compare
import complexity_fvcore
import complexity_ptflops
import complexity_thop
import complexity_torchscan
from models import ANALYSIS_NAMES, MODEL_NAMES
from utils.analysis import complexity_tools
from utils.analysis.model_loading import AnalysisModel, AnalysisSpec, load_analysis_model
from utils.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: in-process torch work on 1 intra-op thread
SCRIPTS = {"fvcore": complexity_fvcore, "ptflops": complexity_ptflops, "thop": complexity_thop,
           "torchscan": complexity_torchscan}


def analysis_model(name: str, num_classes: int = 1000, size=(3, 224, 224)) -> AnalysisModel:
    spec = AnalysisSpec(model=name, num_classes=num_classes, input_size=list(size), weights=None)
    return load_analysis_model(spec, fast_init=True)


@pytest.mark.parametrize("name", MODEL_NAMES + ANALYSIS_NAMES)
def test_every_tool_script_runs_on_cpu_for_every_registry_model(name, tmp_path, capsys):
    """Each script at 32x32 writes its JSON; MACs are at least the conv+matmul count and at most 25 % above it."""
    am = analysis_model(name, 10, (3, 32, 32))
    baseline = complexity_tools.run_flop_counter(am.model, am.input_size)
    true_params = sum(p.numel() for p in am.model.parameters())
    for tool, script in SCRIPTS.items():
        assert script.main(["--model", name, "--num_classes", "10", "--input_size", "3", "32", "32", "--out_dir", str(tmp_path),
                            "--max_depth", "1", "--json"]) == 0
        printed = json.loads(capsys.readouterr().out)
        written = json.loads((tmp_path / f"{name}_32x32_{tool}.json").read_text())
        assert printed["macs"] == written["macs"] and written["units"]["macs"] == "multiply-accumulates"
        assert baseline.macs * 0.999 <= written["macs"] <= baseline.macs * 1.25, (tool, written["macs"], baseline.macs)
        if tool != "torchscan":
            assert written["flops"] == 2 * written["macs"]
        if tool == "thop":
            assert written["params"] <= true_params
        else:
            assert written["params"] == true_params
        assert max(r["depth"] for r in written["per_module"]) <= 1
        assert (tmp_path / f"{name}_32x32_{tool}.txt").read_text().count("MACs") >= 2


def test_resnet18_totals_match_torchvision_published_ops():
    """torchvision's ResNet18 meta "_ops" (1.814, labelled GFLOPS in its docs, added in pytorch/vision#6936) is in
    GMACs: FlopCounterMode's FLOPs / 2 (conv + matmul) equal it. fvcore, ptflops and thop agree within 1 %."""
    published = torchvision.models.ResNet18_Weights.DEFAULT.meta["_ops"] * 1e9
    am = analysis_model("resnet18")
    base = complexity_tools.run_flop_counter(am.model, am.input_size)
    assert round(base.flops / 2 / 1e9, 3) == round(published / 1e9, 3)       # MACs, not FLOPs
    assert round(base.flops / 1e9, 3) != round(published / 1e9, 3)
    for tool in ("fvcore", "ptflops", "thop"):
        res = complexity_tools.run_tool(tool, am.model, am.input_size)
        assert abs(res.macs - published) / published < 0.01, (tool, res.macs)
        assert res.flops == 2 * res.macs
        assert res.params == 11_689_512


def test_macs_are_the_tools_native_numbers_not_relabelled():
    """The seed printed MACs as FLOPs: here MACs equal what each library returns, FLOPs are twice that."""
    from fvcore.nn import FlopCountAnalysis
    from ptflops import get_model_complexity_info
    from thop import profile

    am = analysis_model("custom", 10, (3, 28, 28))
    x = torch.zeros(1, 3, 28, 28)
    fv = FlopCountAnalysis(am.model, x)
    fv.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    assert complexity_tools.run_fvcore(am.model, am.input_size).macs == fv.total()
    pt_macs, pt_params = get_model_complexity_info(am.model, (3, 28, 28), as_strings=False, print_per_layer_stat=False)
    res = complexity_tools.run_ptflops(am.model, am.input_size)
    assert res.macs == pt_macs and res.params == pt_params
    thop_macs, _ = profile(am.model, inputs=(x,), verbose=False)
    assert complexity_tools.run_thop(am.model, am.input_size).macs == thop_macs
    assert not any("total_ops" in k for k in am.model.state_dict())    # thop's counters were removed
    rows = {r["module"]: r["macs"] for r in res.per_module}
    assert rows["features.0"] == 16 * 28 * 28 * 3 * 9              # conv without bias (BN follows)
    assert rows["classifier.1"] == 576 * 256 + 256                  # ptflops: Linear weights + one bias add per output


def test_torchscan_chain_receptive_field_and_warning(capsys, tmp_path):
    chain = complexity_tools.run_torchscan(analysis_model("custom", 10, (3, 28, 28)).model, (3, 28, 28))
    assert chain.extra["single_chain"] and not any("single chain" in w for w in chain.warnings)
    assert chain.extra["chain_receptive_field"][-1]["rf"] == 22        # = the analytic field of FashionCNN's last map
    assert chain.extra["model_size_bytes"] > 0 and chain.extra["dmas"] > 0
    assert complexity_torchscan.main(["--model", "resnet18", "--input_size", "3", "64", "64", "--out_dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "NOT a single chain" in text and "receptive_field.py" in text
    assert "model size:" in text and "DMAs" in text


def test_compare_table_one_unit_and_explanations(tmp_path, capsys):
    assert complexity_compare.main(["--model", "mobilenet_v3_small", "--num_classes", "1000", "--out_dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "all in MMACs / MFLOPs" in text
    for tool in ("fvcore", "ptflops", "thop", "torchscan", "FlopCounterMode"):
        assert f"| {tool} " in text
    payload = json.loads((tmp_path / "mobilenet_v3_small_224x224_compare.json").read_text())
    tools = {t["tool"]: t for t in payload["tools"]}
    published = torchvision.models.MobileNet_V3_Small_Weights.DEFAULT.meta["_ops"] * 1e9
    assert abs(tools["FlopCounterMode"]["macs"] - published) / published < 0.01
    assert "norm" in tools["thop"]["explanation"] and tools["thop"]["by_category"]["norm"] == 2 * tools["fvcore"]["by_category"]["norm"]
    assert any("Hardswish" in w for w in tools["thop"]["warnings"])


def test_checkpoint_and_bad_input(random_resnet18_ckpt, tmp_path, capsys):
    ckpt = random_resnet18_ckpt
    assert complexity_fvcore.main(["--weights", str(ckpt), "--out_dir", str(tmp_path), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["model"] == "resnet18" and res["input_size"] == [3, 64, 64] and res["num_classes"] == 3
    with pytest.raises(InputError, match="cannot run on input"):
        complexity_thop.main(["--model", "alexnet", "--input_size", "3", "8", "8", "--out_dir", str(tmp_path)])
    with pytest.raises(InputError, match="unknown model"):
        complexity_ptflops.main(["--model", "resnet9000", "--out_dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exited:  # refused by the flag's range type
        complexity_fvcore.main(["--model", "custom", "--max_depth", "-1", "--out_dir", str(tmp_path)])
    assert exited.value.code == 2 and "argument --max_depth: must be >= 0, got -1" in capsys.readouterr().err
