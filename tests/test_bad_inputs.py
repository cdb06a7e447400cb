"""A corpus of bad inputs, each driven through the command line as a user would meet it.

Every case asserts exit code 2, that the message names the culprit (file, line and column, key
or class) and that nothing was left under a final name. Model files hostile enough to carry a
payload must never run it: each payload would create a marker file, and the marker never appears
(a control shows each payload is live: run the way an unsafe loader would, it does create it).
Rasters, NetCDF and storage faults are covered by their own modules.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import torch

from sitsflow import cli, layout, sampling, selection, training
from sitsflow.config import load_config
from sitsflow.config.syntax import parse_text
from sitsflow.errors import BadInputError, ConfigError
from sitsflow.nn import fingerprint, load_model, read_model_file, save_model
from sitsflow.nn.registry import load_user_module
from sitsflow.planning import plan_selection, plan_training
from sitsflow.reference import read_color_table, read_nomenclature
from sitsflow.training.stage import CHECKPOINT_FORMAT

from synthetic import write_config, write_scene

NOMENCLATURE = "crops:1\nforest:2\nwater:3\n"
COLORS = "1 255 211 0\n2 0 100 0\n3 0 0 255\n"
USER_NETWORK = (
    "import torch\nfrom sitsflow.nn import Iota2NeuralNetwork\n\n\n"
    "class Net(Iota2NeuralNetwork):\n"
    "    def __init__(self, *, width: int = 8, **framework):\n"
    "        super().__init__(**framework)\n"
    "        self.lin = torch.nn.Linear(self.nb_components, self.nb_classes)\n\n"
    "    def _forward(self, x):\n"
    "        return self.lin(self.normalize_input(x).mean(dim=1))\n"
)


def sitsflow(*args: str) -> tuple[int, str, str]:
    """Run the CLI in this process: (exit code, log text, stdout)."""
    logs, out = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(logs)
    logger = logging.getLogger("sitsflow")
    logger.addHandler(handler)
    try:
        with contextlib.redirect_stdout(out):
            code = cli.main([str(a) for a in args])
    finally:
        logger.removeHandler(handler)
    return code, logs.getvalue(), out.getvalue()


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


def refused(code: int, text: str, *culprits: str) -> None:
    assert code == 2, text[-3000:]
    for culprit in culprits:
        assert culprit in text, f"{culprit!r} not named in:\n{text[-3000:]}"
    assert "Traceback" not in text and "this is a bug" not in text


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad_inputs")
    write_scene(folder, width=36, height=16, nb_dates=6)
    (folder / "nomenclature.txt").write_text(NOMENCLATURE)
    (folder / "colors.txt").write_text(COLORS)
    (folder / "net.py").write_text(USER_NETWORK)
    return folder


def config(folder: Path, name: str = "config.cfg", **kwargs) -> Path:
    """The scene's configuration (with nomenclature and colour table) under another name."""
    extra = kwargs.pop("chain_extra", "")
    path = write_config(folder, **kwargs)
    text = path.read_text().replace(
        "  data_field : 'code'\n",
        "  data_field : 'code'\n  nomenclature_path : 'nomenclature.txt'\n  color_table : 'colors.txt'\n" + extra,
    )
    path.unlink()
    target = folder / name
    target.write_text(text)
    return target


# ============================================================================ configuration syntax
STRAY_IN_ARG_TRAIN = ('"learning_rate" : [0.01, 0.001]}', '"learning_rate" : [0.01, 0.001]}}')


def _syntax_cases(text: str) -> dict[str, tuple[str, str]]:
    """name -> (broken text, the 'line L, column C' the message must give)."""
    lines = text.splitlines()

    def pos(needle: str, offset: int = 0) -> str:
        for n, line in enumerate(lines, 1):
            if needle in line:
                return f"line {n}, column {line.index(needle) + 1 + offset}"
        raise AssertionError(needle)

    chain_end = text.index("}\n") + 2
    stray_line = text[:chain_end].count("\n") + 1
    old, new = STRAY_IN_ARG_TRAIN
    return {
        "stray brace between sections": (text[:chain_end] + "}\n" + text[chain_end:], f"line {stray_line}, column 1"),
        "stray double brace inside arg_train": (text.replace(old, new), pos(old, len(new) - 1)),
        "trailing content": (text + "\nnumber_of_chunks 4\n", f"line {len(lines) + 2}, column 18"),
        "duplicate section": (text + "\nchain : { output_path : 'elsewhere' }\n", f"line {len(lines) + 2}, column 1"),
        "duplicate key": (text.replace("  runs : 1\n", "  runs : 1\n  runs : 2\n"),
                          f"line {lines.index('  runs : 1') + 2}, column 3"),
        "unclosed value": (text.replace('"learning_rate" : [0.01, 0.001]}', '"learning_rate" : [0.01, 0.001]'),
                           pos("hyperparameters_solver : {", len("hyperparameters_solver : "))),
        "unclosed list": (text.replace("bands : ['red', 'nir']", "bands : ['red', 'nir'"), pos("bands : [", 8)),
    }


def test_syntax_errors_name_the_line_and_column_of_the_culprit(scene):
    text = config(scene).read_text()
    for name, (broken, where) in _syntax_cases(text).items():
        with pytest.raises(ConfigError) as info:
            parse_text(broken, "x.cfg")
        message = str(info.value)
        assert where in message.splitlines()[0], f"{name}: expected {where} in {message}"
        assert "--set" not in message, name


def test_valid_layouts_still_parse(scene):
    """The checks never refuse what the package accepts: brackets over several lines, sloppy indentation."""
    values, _ = parse_text("a :\n{\nb : {\n c : [1,\n      2]\n}\n    d : {'x' : '}'}\n}\n", "ok.cfg")
    assert values == {"a": {"b": {"c": [1, 2]}, "d": {"x": "}"}}}


@pytest.mark.parametrize(
    "command",
    [["prepare"], ["run"], ["sample"], ["plan", "training"], ["train", "--region", "1", "--seed", "0", "--hyp", "0"],
     ["select", "--region", "1", "--seed", "0"], ["infer", "--tile", "T1", "--chunk", "0", "--seed", "0"],
     ["merge"]],
    ids=lambda c: c[0],
)
def test_every_entry_point_refuses_a_stray_brace_before_any_work(scene, tmp_path, command):
    old, new = STRAY_IN_ARG_TRAIN
    path = config(scene, name="stray.cfg", output=str(tmp_path / "out"))
    path.write_text(path.read_text().replace(old, new))
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if new in text)
    where = ["--config", str(path)] if command[0] != "run" else [str(path)]
    code, text, out = sitsflow(*command, *where, "--set", "arg_train.deep_learning_parameters.epochs=1")
    refused(code, text, f"stray.cfg:{line} (line {line}, column", "an extra '}'")
    assert "--set" not in text and out == ""
    assert files_under(tmp_path / "out") == set()


def test_a_stray_brace_in_an_override_is_blamed_on_the_override(scene, tmp_path):
    path = config(scene, name="fine.cfg", output=str(tmp_path / "out"))
    code, text, _ = sitsflow("prepare", "--config", path,
                             "--set", "arg_train.deep_learning_parameters.dl_parameters={'hidden_layers': [8]}}")
    refused(code, text, "dl_parameters", "from --set")
    assert files_under(tmp_path / "out") == set()


# ============================================================================ nomenclature, colour table
@pytest.mark.parametrize(
    ("file", "content", "culprits"),
    [
        ("nomenclature.txt", "crops:1\nwater:2\nforest:2\n", ["nomenclature.txt:3", "class code 2 is given twice",
                                                               "line 2 names it 'water'"]),
        ("nomenclature.txt", "crops:1\nforest:2\ncrops:3\n", ["nomenclature.txt:3", "class name 'crops' is given twice",
                                                               "line 1 with code 1"]),
        ("nomenclature.txt", "crops:1\nforest-2\n", ["nomenclature.txt:2", "expected 'name:code'"]),
        ("nomenclature.txt", "crops:one\n", ["nomenclature.txt:1", "no integer class code"]),
        ("nomenclature.txt", "# nothing\n\n", ["nomenclature.txt lists no class"]),
        ("colors.txt", "1 255 211 0\n2 0 100 0\n1 0 0 255\n3 0 0 0\n", ["colors.txt:3", "class code 1 is given twice",
                                                                        "first at line 1"]),
        ("colors.txt", "1 255 211 0\n2 0 100 300\n3 0 0 0\n", ["colors.txt:2", "0..255"]),
        ("colors.txt", "1 255 211\n", ["colors.txt:1", "expected 'code R G B'"]),
        ("colors.txt", "1 255 211 0\n3 0 0 255\n", ["colors.txt has no colour for 1 class(es)", "2 (forest)"]),
    ],
    ids=["duplicate code", "duplicate name", "no colon", "no code", "empty", "duplicate colour", "component",
         "short colour line", "class without colour"],
)
def test_class_files_are_checked_by_prepare(scene, tmp_path, file, content, culprits):
    folder = tmp_path / "scene"
    shutil.copytree(scene, folder)
    (folder / file).write_text(content)
    path = config(folder, output=str(tmp_path / "out"))
    code, text, _ = sitsflow("prepare", "--config", path)
    refused(code, text, *culprits)
    assert files_under(tmp_path / "out") == set()


def _with_sample_selection(path: Path, rule: str) -> Path:
    path.write_text(path.read_text().replace("  random_seed : 0\n", f"  random_seed : 0\n  sample_selection : {rule}\n"))
    return path


@pytest.mark.parametrize(
    ("rule", "culprits"),
    [
        ('{"sampler" : "random", "strategy" : "percentage"}',
         ["arg_train.sample_selection: strategy: expected one of 'all', 'smallest', 'percent'", "got 'percentage'"]),
        ('{"sampler" : "random", "strategy" : "percent", "strategy.percent.p" : 10}',
         ["arg_train.sample_selection: strategy.percent.p: expected a number 0 < p <= 1", "got 10"]),
        ('{"sampler" : "periodic", "sampler.periodic.jitter" : 2, "strategy" : "all"}',
         ["arg_train.sample_selection: unknown key 'sampler.periodic.jitter'; allowed keys: sampler, strategy"]),
    ],
    ids=["strategy", "percent", "jitter"],
)
def test_bad_sample_selection_exits_2_before_any_work(scene, tmp_path, rule, culprits):
    path = _with_sample_selection(config(scene, output=str(tmp_path / "out")), rule)
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "sample_selection :" in text)
    for command in (["prepare", "--config", path], ["run", path, "--no-progress"]):
        code, text, _ = sitsflow(*command)
        refused(code, text, *culprits, f"config.cfg:{line}")
    assert files_under(tmp_path / "out") == set()


@pytest.mark.parametrize(
    ("extra", "culprits"),
    [
        ("arg_classification : { classif_mode : 'fusion' }\n",
         ["arg_classification.classif_mode = 'fusion'", "only iota2's default 'separate'", "sub-models"]),
        ("chain_extra", ["chain.s1_path = 's1.cfg'", "this sensor is not supported", "dated_raster"]),
        ("arg_classification : { merge_final_classifications_method : 'dempstershafer' }\n",
         ["'dempstershafer' is not implemented", "use 'majorityvoting'"]),
    ],
    ids=["classif_mode", "s1_path", "dempstershafer"],
)
def test_iota2_keys_that_would_change_the_map_exit_2_before_any_work(scene, tmp_path, extra, culprits):
    if extra == "chain_extra":
        path = config(scene, output=str(tmp_path / "out"), chain_extra="  s1_path : 's1.cfg'\n")
    else:
        path = config(scene, output=str(tmp_path / "out"), extra=extra)
    for command in (["prepare", "--config", path], ["run", path, "--no-progress"]):
        code, text, _ = sitsflow(*command)
        refused(code, text, *culprits, "config.cfg:")
    assert files_under(tmp_path / "out") == set()


@pytest.mark.parametrize(
    ("content", "culprits"),
    [
        ("1 10\n2 ten\n", ["counts.txt:2", "expected 'class count'", "got '2 ten'"]),
        ("1 10\n1 5\n", ["counts.txt:2", "class 1 is listed twice"]),
        (None, ["counts.txt", "no such file"]),
    ],
    ids=["not a count", "twice", "missing"],
)
def test_bad_byclass_file_exits_2_in_prepare(scene, tmp_path, content, culprits):
    folder = tmp_path / "scene"
    shutil.copytree(scene, folder)
    if content is not None:
        (folder / "counts.txt").write_text(content)
    rule = '{"sampler" : "random", "strategy" : "byclass", "strategy.byclass.in" : "counts.txt"}'
    path = _with_sample_selection(config(folder, output=str(tmp_path / "out")), rule)
    code, text, _ = sitsflow("prepare", "--config", path)
    refused(code, text, *culprits)
    assert files_under(tmp_path / "out") == set()


def test_class_files_readers_keep_what_is_right(tmp_path):
    (tmp_path / "n.txt").write_text("# iota2\ncrops : 1\n\n12:water\n")
    (tmp_path / "c.txt").write_text("1 255 211 0\n12,0,0,255\n")
    assert read_nomenclature(str(tmp_path / "n.txt")) == {1: "crops", 12: "water"}
    assert read_color_table(str(tmp_path / "c.txt")) == {1: (255, 211, 0), 12: (0, 0, 255)}
    assert read_nomenclature(None) == {} and read_color_table(None) == {}


# ============================================================================ vectors
def _empty_vector(path: Path, driver: str) -> None:
    pyogrio.raw.write(str(path), geometry=np.array([], dtype=object), field_data=[np.array([], np.int64)],
                      fields=["code"], crs="EPSG:32631", geometry_type="Polygon", driver=driver)


@pytest.mark.parametrize(
    ("name", "make", "culprits"),
    [
        ("empty.gpkg", lambda p: _empty_vector(p, "GPKG"), ["chain.ground_truth", "empty.gpkg holds no feature"]),
        ("empty.geojson", lambda p: p.write_text('{"type": "FeatureCollection", "features": []}'),
         ["chain.ground_truth", "empty.geojson holds no feature"]),
        ("garbage.gpkg", lambda p: p.write_bytes(b"not a geopackage at all" * 10),
         ["chain.ground_truth", "cannot read vector file", "garbage.gpkg"]),
        ("nofield.geojson", lambda p: p.write_text(
            '{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {"class": 1}, '
            '"geometry": {"type": "Point", "coordinates": [300005, 4999995]}}]}'),
         ["chain.ground_truth", "has no field 'code'", "'class'"]),
    ],
    ids=["empty gpkg", "empty geojson", "not a vector", "missing field"],
)
def test_bad_ground_truth_exits_2_naming_the_file(scene, tmp_path, name, make, culprits):
    make(tmp_path / name)
    path = config(scene, name="gt.cfg", output=str(tmp_path / "out"))
    path.write_text(path.read_text().replace("'polygons.geojson'", repr(str(tmp_path / name))))
    code, text, _ = sitsflow("sample", "--config", path)
    refused(code, text, *culprits)
    assert not any(f.startswith(layout.LEARNING_SAMPLES) for f in files_under(tmp_path / "out"))


# ============================================================================ user networks, dl_parameters
HEAD = "import torch\nfrom sitsflow.nn import Iota2NeuralNetwork\n"


@pytest.mark.parametrize(
    ("module", "dl_name", "dl_parameters", "culprits"),
    [
        (None, "MLPClassifier", {"hidden_layer": [8]}, ["dl_parameters.hidden_layer", "has no parameter"]),
        (None, "LTAEClassifier", {"n_head": 7}, ["n_head", "must divide d_model"]),
        (None, "MLPClassifier", {"dropout": "0.1"}, ["dl_parameters.dropout", "expected float"]),
        ("missing.py", "Net", {}, ["dl_module", "missing.py"]),
        (HEAD + "class Net(Iota2NeuralNetwork)\n    pass\n", "Net", {}, ["net_bad.py: syntax error at line 3"]),
        (HEAD + "import not_a_module_anyone_has\n", "Net", {}, ["net_bad.py: importing the module failed at line 3",
                                                               "ModuleNotFoundError"]),
        (USER_NETWORK, "Other", {}, ["class 'Other' not found in", "networks found there: Net"]),
        (HEAD + "class Net(torch.nn.Module):\n    pass\n", "Net", {}, ["must be a class derived from"]),
        (USER_NETWORK, "Net", {"width": "8"}, ["dl_parameters.width", "expected int"]),
        (USER_NETWORK.replace("super().__init__(**framework)", "super().__init__(**framework)\n"
                              "        assert width > 8, 'width must exceed 8'"),
         "Net", {}, ["building network Net", "line 8", "width must exceed 8"]),
        (USER_NETWORK.replace("return self.lin(", "return self.lin(x.flatten(1) + "),
         "Net", {}, ["fails on a dummy batch of 5 dates x 2 components", "line 11", "net_bad.py"]),
        (USER_NETWORK.replace("self.lin = torch.nn.Linear(self.nb_components, self.nb_classes)",
                              "self.lin = torch.nn.Linear(self.nb_components, 5)"),
         "Net", {}, ["returned shape (2, 5)", "expected (batch, nb_classes) = (2, 3)"]),
    ],
    ids=["unknown key", "value refused", "wrong type", "missing module", "syntax", "import", "class missing",
         "not a network", "user parameter type", "constructor", "forward", "logits shape"],
)
def test_network_mistakes_exit_2_in_prepare_and_run_before_any_sampling(scene, tmp_path, module, dl_name,
                                                                        dl_parameters, culprits):
    out = tmp_path / "out"
    extra = f"    dl_parameters : {json.dumps(dl_parameters)}\n"
    if module is not None:
        target = tmp_path / ("net_bad.py" if module != "missing.py" else "missing.py")
        if module != "missing.py":
            target.write_text(module)
        extra += f"    dl_module : '{target}'\n"
    path = config(scene, name="net.cfg", output=str(out), dl_name=dl_name, dl_extra=extra)
    for command in (["prepare", "--config", path], ["run", path, "--no-progress"]):
        code, text, _ = sitsflow(*command)
        refused(code, text, *culprits)
        assert files_under(out) == set(), command


def test_prepare_builds_the_network_on_the_first_tiles_layout(scene, tmp_path):
    module = tmp_path / "net.py"
    module.write_text(USER_NETWORK.replace("super().__init__(**framework)",
                                           "super().__init__(**framework)\n"
                                           "        open(SEEN, 'a').write(f'{self.nb_dates} {self.nb_components} "
                                           "{self.nb_classes} {self.sensor}\\n')")
                      .replace("class Net", f"SEEN = {str(tmp_path / 'seen.txt')!r}\nprint('chatty module')\n\n\n"
                               "class Net"))
    path = config(scene, name="ok.cfg", output=str(tmp_path / "out"), dl_name="Net",
                  dl_extra=f"    dl_module : '{module}'\n")
    code, text, out = sitsflow("prepare", "--config", path)
    assert code == 0, text
    cfg = load_config(str(path))
    from sitsflow.features import FeaturePipeline

    pipe = FeaturePipeline(cfg, "T1")
    assert (tmp_path / "seen.txt").read_text() == f"{len(pipe.dates)} 2 3 {pipe.sensor}\n"
    assert json.loads(out)["config"].endswith("resolved.cfg")  # what the module printed went to stderr


# ============================================================================ model files
class Payload:
    """Unpickling this object runs ``exec(code)``: the code creates a marker file."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def _torch_bytes(obj: object, **kwargs) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


def _with_description(data: bytes, version: int, **changes) -> bytes:
    """A model file whose description is changed, its fingerprint recomputed (as a forger would)."""
    parsed = read_model_file(data)
    description = {k: v for k, v in parsed["description"].items() if k != "fingerprint"} | changes
    description["format_version"] = version
    description["fingerprint"] = fingerprint(description, parsed["state_dict"], parsed["stats"])
    return _torch_bytes({"format": "sitsflow-model", "format_version": version, "description": json.dumps(description),
                         "state_dict": parsed["state_dict"], "stats": parsed["stats"]})


@pytest.fixture(scope="module")
def trained(scene, tmp_path_factory):
    """An output tree through selection (MLPClassifier, one epoch), for the model-file cases."""
    out = tmp_path_factory.mktemp("trained") / "out"
    path = config(scene, name="trained.cfg", output=str(out), epochs=1, chunks=1)
    cfg = load_config(str(path))
    sampling.run(cfg)
    for t in plan_training(cfg):
        training.run(cfg, t["region"], t["seed"], t["hyp"])
    for t in plan_selection(cfg):
        selection.run(cfg, t["region"], t["seed"])
    return path, out, Path(layout.model_selected(str(out), 1, 0)).read_bytes()


def _payloads(genuine: bytes, marker: Path) -> dict[str, tuple[bytes, str, bool]]:
    """name -> (model file bytes, what the refusal says, whether the configuration names dl_module)."""
    code = f"open({str(marker)!r}, 'w').close()"
    source = f"{code}\nfrom sitsflow.nn import MLPClassifier as Evil\n"
    builtin_source = f"{code}\nfrom sitsflow.nn import MLPClassifier\n"
    sha = hashlib.sha256(source.encode()).hexdigest()
    checkpoint = {"format": CHECKPOINT_FORMAT, "fingerprint": "x", "epoch": 1, "network": Payload(code)}
    return {
        "pickle in a torch archive": (_torch_bytes({"format": "sitsflow-model", "x": Payload(code)}),
                                      "holds objects other than plain tensors", False),
        "raw pickle": (pickle.dumps(Payload(code)), "not a torch archive", False),
        "legacy torch pickle": (_torch_bytes({"x": Payload(code)}, _use_new_zipfile_serialization=False),
                                "not a torch archive", False),
        "pickle in a checkpoint": (_torch_bytes(checkpoint), "holds objects other than plain tensors", False),
        "embedded source, no dl_module": (
            _with_description(genuine, 1, network="Evil", module_source=source, module_sha256=None),
            f"carries Python source for network 'Evil' (sha256 {sha}) and no dl_module is configured", False),
        "embedded source, other dl_module": (
            _with_description(genuine, 1, network="Evil", module_source=source, module_sha256=None),
            f"trained with the dl_module <unknown> (sha256 {sha}), which is not the configured dl_module", True),
        "recorded sha256 of foreign code": (
            _with_description(genuine, 2, network="Net", module_sha256=sha, module_uri="s3://evil/net.py"),
            f"trained with the dl_module s3://evil/net.py (sha256 {sha}), which is not the configured dl_module", True),
        "source in a format 2 file": (
            _with_description(genuine, 2, network="Evil", module_source=source),
            "which only format 1 model files held", True),
        "built-in network with source": (
            _with_description(genuine, 1, module_source=builtin_source),
            "names the built-in network 'MLPClassifier' but carries Python source", False),
        "built-in network with source, dl_module set": (
            _with_description(genuine, 1, module_source=builtin_source),
            "names the built-in network 'MLPClassifier' but carries Python source", True),
    }


def test_payloads_are_live(tmp_path, trained):
    """The control: loaded the unsafe way, every kind of payload does create its marker."""
    marker = tmp_path / "marker"
    cases = _payloads(trained[2], marker)
    pickle.loads(cases["raw pickle"][0])
    assert marker.exists()
    marker.unlink()
    torch.load(io.BytesIO(cases["pickle in a torch archive"][0]), weights_only=False)
    assert marker.exists()
    marker.unlink()
    torch.load(io.BytesIO(cases["pickle in a checkpoint"][0]), weights_only=False)
    assert marker.exists()
    marker.unlink()
    load_user_module(json.loads(torch.load(io.BytesIO(cases["built-in network with source"][0]))["description"])
                     ["module_source"], "control.py")
    assert marker.exists()


@pytest.mark.parametrize(
    "case",
    ["pickle in a torch archive", "raw pickle", "legacy torch pickle", "pickle in a checkpoint",
     "embedded source, no dl_module", "embedded source, other dl_module", "recorded sha256 of foreign code",
     "source in a format 2 file", "built-in network with source", "built-in network with source, dl_module set"],
)
def test_hostile_model_files_are_refused_and_run_nothing(trained, tmp_path, case):
    path, out, genuine = trained
    marker = tmp_path / "marker"
    data, message, with_module = _payloads(genuine, marker)[case]
    selected = Path(layout.model_selected(str(out), 1, 0))
    before = files_under(out)
    sets = ["--set", f"arg_train.deep_learning_parameters.dl_module={path.parent / 'net.py'}"] if with_module else []
    try:
        selected.write_bytes(data)
        code, text, stdout = sitsflow("infer", "--config", path, "--tile", "T1", "--chunk", "0", "--seed", "0", *sets)
    finally:
        selected.write_bytes(genuine)
    refused(code, text, message, "model")
    assert not marker.exists() and stdout == ""
    assert files_under(out) == before  # no chunk, no manifest
    with pytest.raises(BadInputError, match=re.escape(message)):
        load_model(data, module_source=USER_NETWORK if with_module else None)
    assert not marker.exists()


def test_the_genuine_model_still_classifies(trained):
    path, _, genuine = trained
    _, description = load_model(genuine)
    assert description["module_sha256"] is None and "module_source" not in description
    code, text, stdout = sitsflow("infer", "--config", path, "--tile", "T1", "--chunk", "0", "--seed", "0")
    assert code == 0, text
    assert json.loads(stdout)["tile"] == "T1"


def test_a_format_1_model_runs_only_the_configured_module_it_embeds(tmp_path):
    """Compatibility: an old file that embedded its dl_module loads when that text is the configured one."""
    from sitsflow.nn import build_network

    fw = {"nb_dates": 3, "nb_components": 2, "nb_classes": 2, "dates": [20200101, 20200111, 20200121],
          "stats": {"s": {"mean": torch.zeros(6), "var": torch.ones(6)}}, "sensor": "s"}
    net = build_network("Net", {}, module_source=USER_NETWORK, module_uri="net.py", **fw)
    old = _with_description(save_model(net, {}), 1, module_source=USER_NETWORK, module_sha256=None)
    loaded, _ = load_model(old, module_source=USER_NETWORK, module_uri="net.py")
    x = torch.rand(4, 3, 2)
    torch.testing.assert_close(loaded(x), net.eval()(x))
    with pytest.raises(BadInputError, match="no dl_module is configured"):
        load_model(old)


def test_a_pickled_checkpoint_is_refused_and_training_starts_afresh(trained, tmp_path):
    path, out, _ = trained
    marker = tmp_path / "marker"
    task = "region_1_seed_0_hyp_0"
    Path(layout.manifest(str(out), "training", task)).unlink()
    model = Path(layout.model_candidate(str(out), 1, 0, 0))
    before = model.read_bytes()
    checkpoint = Path(layout.model_checkpoint(str(out), 1, 0, 0))
    checkpoint.write_bytes(_torch_bytes({"format": CHECKPOINT_FORMAT, "x": Payload(f"open({str(marker)!r}, 'w')")}))
    code, text, _ = sitsflow("train", "--config", path, "--region", "1", "--seed", "0", "--hyp", "0",
                             "--set", "arg_train.deep_learning_parameters.restart_from_checkpoint=True")
    assert code == 0, text
    assert "refusing checkpoint" in text and "nothing in it ran" in text
    assert not marker.exists()
    assert read_model_file(model.read_bytes())["description"]["fingerprint"] == \
        read_model_file(before)["description"]["fingerprint"]  # the same training, from scratch


def test_a_user_network_classifies_with_its_module_and_is_refused_once_the_module_changes(trained, tmp_path):
    path, out, _ = trained
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    module = tmp_path / "net.py"
    module.write_text(USER_NETWORK)
    sets = [f"chain.output_path={copy}", "arg_train.deep_learning_parameters.dl_name=Net",
            f"arg_train.deep_learning_parameters.dl_module={module}"]
    cfg = load_config(str(path), sets)
    for t in plan_training(cfg):
        training.run(cfg, t["region"], t["seed"], t["hyp"])
    for t in plan_selection(cfg):
        selection.run(cfg, t["region"], t["seed"])
    args = ["infer", "--config", path, "--tile", "T1", "--chunk", "0", "--seed", "0"]
    args += [a for s in sets for a in ("--set", s)]
    code, text, _ = sitsflow(*args)
    assert code == 0, text
    module.write_text(USER_NETWORK + "\n# edited after training\n")
    shutil.rmtree(copy / "manifests" / "inference")  # so nothing could be skipped as done
    before = files_under(copy)
    code, text, _ = sitsflow(*args)
    trained_sha = hashlib.sha256(USER_NETWORK.encode()).hexdigest()
    edited_sha = hashlib.sha256(module.read_bytes()).hexdigest()
    refused(code, text, f"trained with the dl_module {module} (sha256 {trained_sha})",
            f"not the configured dl_module {module} (sha256 {edited_sha})")
    assert files_under(copy) == before
