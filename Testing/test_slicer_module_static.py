"""The Slicer module checked without Slicer: the .ui against the widget code and parameter node.

A real Slicer is the only place the panel can run; these checks catch what breaks it most
often (a renamed widget, a parameter without a widget, an import of Qt where none belongs).
"""

from __future__ import annotations

import ast
import py_compile
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "OFLSAM2Slicer"
MODULE = MODULE_DIR / "OFLSAM2Slicer.py"
UI = MODULE_DIR / "Resources" / "UI" / "OFLSAM2Slicer.ui"
REQUIREMENTS = MODULE_DIR / "Resources" / "requirements.txt"
GUI_ONLY = ("qt", "ctk", "slicer.ScriptedLoadableModule")

# The widget class each parameter type needs (Slicer's GUI connectors match the exact class).
CONNECTOR_WIDGETS = {
    "bool": {"QCheckBox", "QPushButton"},
    "int": {"QSpinBox", "QSlider"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget"},
    "str": {"QLineEdit", "QTextEdit", "QComboBox"},
    "node": {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView"},
    "enum": {"QComboBox"},
}


@pytest.fixture(scope="module")
def module_tree() -> ast.Module:
    return ast.parse(MODULE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def parameter_fields(tree: ast.Module) -> dict[str, str]:
    """Fields of the @parameterNodeWrapper class: name -> kind (bool, int, float, str, node, enum)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(
            (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper")
            for d in node.decorator_list
        ):
            fields = {}
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    fields[item.target.id] = _kind(item.annotation)
            return fields
    raise AssertionError("no @parameterNodeWrapper class in the module")


def _kind(annotation: ast.expr) -> str:
    if isinstance(annotation, ast.Subscript) and getattr(annotation.value, "id", "") == "Annotated":
        annotation = annotation.slice.elts[0]
    name = annotation.id if isinstance(annotation, ast.Name) else ast.unparse(annotation)
    if name in ("bool", "int", "float", "str"):
        return name
    if name.startswith("vtkMRML"):
        return "node"
    return "enum"


def module_constant(tree: ast.Module, name: str):
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", None) == name for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} is not defined in the module")


def bound_widgets(widgets: dict[str, ET.Element]) -> dict[str, ET.Element]:
    """Parameter name -> widget for every widget with a SlicerParameterName property."""
    out = {}
    for widget in widgets.values():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                name = prop.find("string").text
                assert name not in out, f"two widgets bound to {name}"
                out[name] = widget
    return out


def test_ui_is_well_formed_with_a_qmrmlwidget_root():
    root = ET.parse(UI).getroot()
    assert root.tag == "ui"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "OFLSAM2Slicer"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"


def test_every_widget_the_code_uses_exists(module_tree, ui_widgets):
    used = {
        node.attr
        for node in ast.walk(module_tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "ui"
        and isinstance(node.value.value, ast.Name)
        and node.value.value.id == "self"
    }
    assert used, "the module uses no self.ui widgets?"
    missing = sorted(used - set(ui_widgets))
    assert not missing, f"widgets used in OFLSAM2Slicer.py but absent from the .ui: {missing}"


def test_bound_widgets_name_parameter_fields(module_tree, ui_widgets):
    fields = parameter_fields(module_tree)
    bound = bound_widgets(ui_widgets)
    unknown = sorted(set(bound) - set(fields))
    assert not unknown, f"SlicerParameterName values that are no parameter field: {unknown}"


def test_every_gui_parameter_has_a_widget_of_the_right_class(module_tree, ui_widgets):
    fields = parameter_fields(module_tree)
    manual = set(module_constant(module_tree, "MANUALLY_BOUND_PARAMETERS"))
    bound = bound_widgets(ui_widgets)
    assert manual <= set(fields)
    missing = sorted(set(fields) - set(bound) - manual)
    assert not missing, f"parameters with no widget: {missing}"
    assert not (manual & set(bound)), "a parameter is bound both by hand and by the .ui"
    for name, widget in bound.items():
        assert widget.get("class") in CONNECTOR_WIDGETS[fields[name]], (
            f"{name} ({fields[name]}) is bound to a {widget.get('class')}, which no connector handles"
        )


def test_manually_bound_parameters_are_set_by_the_code(module_tree):
    manual = module_constant(module_tree, "MANUALLY_BOUND_PARAMETERS")
    stores = {
        node.attr
        for node in ast.walk(module_tree)
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
    }
    for name in manual:
        assert name in stores, f"{name} is never written to the parameter node"


def test_segment_selector_and_node_combos_get_the_scene(ui_widgets):
    root = ET.parse(UI).getroot()
    receivers = {
        c.find("receiver").text
        for c in root.iter("connection")
        if c.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"
    }
    mrml = {
        n
        for n, w in ui_widgets.items()
        if w.get("class", "").startswith("qMRML") and n != "OFLSAM2Slicer"
    }
    assert mrml <= receivers, f"MRML widgets without setMRMLScene: {sorted(mrml - receivers)}"


def test_module_compiles_and_follows_the_template(module_tree, tmp_path):
    py_compile.compile(str(MODULE), cfile=str(tmp_path / "m.pyc"), doraise=True)
    classes = {n.name: n for n in module_tree.body if isinstance(n, ast.ClassDef)}
    for name, base in (
        ("OFLSAM2Slicer", "ScriptedLoadableModule"),
        ("OFLSAM2SlicerWidget", "ScriptedLoadableModuleWidget"),
        ("OFLSAM2SlicerLogic", "ScriptedLoadableModuleLogic"),
        ("OFLSAM2SlicerTest", "ScriptedLoadableModuleTest"),
    ):
        assert name in classes, f"class {name} missing"
        assert base in {getattr(b, "id", None) for b in classes[name].bases}
    source = MODULE.read_text(encoding="utf-8")
    for needle in (
        "connectGui",
        "tryWithErrorDisplay",
        "QTimer",
        "saveStateForUndo",
        "PyTorchUtils",
    ):
        assert needle in source, needle


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _is(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("package", ["oflsam2", "oflsam2_slicer"])
def test_gui_imports_only_in_the_module_file(package):
    files = sorted((MODULE_DIR / package).rglob("*.py"))
    assert files
    for path in files:
        for name in _imports(path):
            bad = [p for p in GUI_ONLY if _is(name, p)]
            assert not bad, f"{path.relative_to(ROOT)} imports {name}"


def test_engine_never_imports_slicer():
    for path in sorted((MODULE_DIR / "oflsam2").rglob("*.py")):
        for name in _imports(path):
            assert not (_is(name, "slicer") or _is(name, "vtk") or _is(name, "oflsam2_slicer")), (
                f"{path.relative_to(ROOT)} imports {name}"
            )


def test_gui_imports_are_in_the_module_file():
    names = _imports(MODULE)
    for prefix in ("qt", "slicer.ScriptedLoadableModule"):
        assert any(_is(n, prefix) for n in names), prefix


def _requirement_names(lines) -> set[str]:
    out = set()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            out.add(re.split(r"[<>=!~\[ ;]", line, maxsplit=1)[0].lower())
    return out


def test_slicer_requirements_cover_the_engine():
    """Resources/requirements.txt holds the engine's pip dependencies (torch/sam2 come separately)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    engine = _requirement_names(project["dependencies"])
    slicer_reqs = _requirement_names(REQUIREMENTS.read_text(encoding="utf-8").splitlines())
    assert engine <= slicer_reqs, f"missing from requirements.txt: {sorted(engine - slicer_reqs)}"
    assert not ({"torch", "torchvision", "sam2"} & slicer_reqs), (
        "torch and sam2 are installed separately"
    )


def test_planning_needs_no_mrml():
    """The planning module works on numpy arrays only, so it is testable without a scene."""
    path = MODULE_DIR / "oflsam2_slicer" / "planning.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    relative = {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level > 0 and node.module
    }
    assert relative <= {"errors"}, f"planning.py imports glue modules {sorted(relative)}"
    for name in _imports(path):
        assert not (_is(name, "slicer") or _is(name, "vtk")), f"planning.py imports {name}"


def test_dependency_check_knows_every_requirement():
    from oflsam2_slicer import REQUIRED_IMPORTS

    slicer_reqs = _requirement_names(REQUIREMENTS.read_text(encoding="utf-8").splitlines())
    checked = _requirement_names(REQUIRED_IMPORTS.values())
    assert slicer_reqs <= checked, (
        f"requirements never checked before use: {sorted(slicer_reqs - checked)}"
    )
