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
        "TaskRunner",
        "waitWithEvents",
        "saveStateForUndo",
        "PyTorchUtils",
    ):
        assert needle in source, needle
    for poll in ("QTimer()", "setInterval"):  # a timer-polled worker thread starves in Slicer
        assert poll not in source, poll


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


# Engine dependencies Slicer must not pip-install: its own SimpleITK, and what only the
# command line uses (progress bars, reading .seg.nrrd files outside Slicer).
NOT_IN_SLICER = {"simpleitk", "slicerio", "tqdm"}


def test_slicer_requirements_cover_the_engine():
    """Resources/requirements.txt holds the engine's pip dependencies (torch/sam2 come separately)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    engine = _requirement_names(project["dependencies"]) - NOT_IN_SLICER
    slicer_reqs = _requirement_names(REQUIREMENTS.read_text(encoding="utf-8").splitlines())
    assert engine <= slicer_reqs, f"missing from requirements.txt: {sorted(engine - slicer_reqs)}"
    assert not ({"torch", "torchvision", "sam2"} & slicer_reqs), (
        "torch and sam2 are installed separately"
    )
    assert not (NOT_IN_SLICER & slicer_reqs), sorted(NOT_IN_SLICER & slicer_reqs)


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


# ---------------------------------------------------------------- loads in an old Slicer too


def _guard(tree: ast.Module) -> ast.If:
    """The module's ``if SUPPORTED:`` block that imports our packages."""
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "SUPPORTED":
            return node
    raise AssertionError("no `if SUPPORTED:` block in the module")


def _ours(name: str) -> bool:
    return _is(name, "oflsam2") or _is(name, "oflsam2_slicer")


def test_module_file_loads_in_python_39_and_imports_us_only_after_the_check(module_tree):
    """Slicer 5.8 (Python 3.9) must load the file to show "needs Slicer 5.10" in the panel."""
    source = MODULE.read_text(encoding="utf-8")
    ast.parse(source, feature_version=(3, 9))  # no match, no except*, no newer syntax
    assert "from __future__ import annotations" in source  # annotations are never evaluated
    guard = _guard(module_tree)
    assignment = [
        n
        for n in module_tree.body[: module_tree.body.index(guard)]
        if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "SUPPORTED" for t in n.targets)
    ]
    assert assignment and "pythonProblem()" in ast.unparse(assignment[0].value)
    guarded = {id(n) for n in ast.walk(guard)}
    for node in ast.walk(module_tree):
        if isinstance(node, ast.ImportFrom | ast.Import):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            top_level = node in module_tree.body
            if any(_ours(n) for n in names):
                assert id(node) in guarded or not top_level, ast.unparse(node)
        if isinstance(node, ast.Call):  # zip(..., strict=...) needs 3.10
            assert not any(k.arg == "strict" for k in node.keywords), ast.unparse(node)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):  # X | Y types: 3.10
            raise AssertionError(f"`|` evaluated at run time: {ast.unparse(node)}")
        if isinstance(node, ast.With) and len(node.items) > 1:
            raise AssertionError("several context managers in one `with`: keep it 3.9-safe")
    # the classes Slicer instantiates on any Python exist outside the guard
    top = {n.name for n in module_tree.body if isinstance(n, ast.ClassDef)}
    assert {
        "OFLSAM2Slicer",
        "OFLSAM2SlicerWidget",
        "OFLSAM2SlicerLogic",
        "OFLSAM2SlicerTest",
    } <= top


def test_old_python_gets_a_message_in_the_panel(module_tree):
    from oflsam2_slicer import dependencies

    assert module_constant(module_tree, "MINIMUM_PYTHON") == dependencies.MINIMUM_PYTHON
    assert module_constant(module_tree, "MINIMUM_SLICER") == dependencies.MINIMUM_SLICER == "5.10"
    setup = _method(module_tree, "OFLSAM2SlicerWidget", "setup")
    first = [ast.unparse(n) for n in setup.body[:3]]
    assert "problem = pythonProblem()" in first, first  # before loading the .ui or the logic
    check = setup.body[2]
    assert isinstance(check, ast.If) and isinstance(check.body[-1], ast.Return)
    assert "QLabel" in ast.unparse(check)


def _method(tree: ast.Module, cls: str, name: str) -> ast.FunctionDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == name:
                    return item
    raise AssertionError(f"{cls}.{name} missing")


# ---------------------------------------------------------------- panel state after errors


def _is_error_display(node: ast.stmt) -> bool:
    return isinstance(node, ast.With) and any(
        "tryWithErrorDisplay" in ast.unparse(item.context_expr) for item in node.items
    )


def test_buttons_are_updated_in_finally_after_an_error_display(module_tree):
    """tryWithErrorDisplay re-raises: a _updateButtons() after it would be skipped."""
    for function in ast.walk(module_tree):
        if not isinstance(function, ast.FunctionDef):
            continue
        for body in (getattr(n, "body", None) for n in ast.walk(function)):
            if not isinstance(body, list):
                continue
            for i, statement in enumerate(body):
                if not _is_error_display(statement):
                    continue
                for later in body[i + 1 :]:
                    assert "_updateButtons()" not in ast.unparse(later), (
                        f"{function.name}: _updateButtons() after tryWithErrorDisplay, not in finally"
                    )


def test_undo_and_imports_update_the_panel_in_finally(module_tree):
    for name in ("onUndo", "onImportWeights"):
        tries = [
            n
            for n in ast.walk(_method(module_tree, "OFLSAM2SlicerWidget", name))
            if isinstance(n, ast.Try)
        ]
        assert any("_update" in ast.unparse(t.finalbody) for t in tries if t.finalbody), name


# ---------------------------------------------------------------- Slicer's conventions


def test_module_description_for_the_extensions_index(module_tree):
    init = _method(module_tree, "OFLSAM2Slicer", "__init__")
    text = ast.unparse(init)
    assert "translate('qSlicerAbstractCoreModule', 'Segmentation')" in text
    assert "<a href=" in text and "DOCUMENTATION_URL" in text  # a documentation link
    url = module_constant(module_tree, "DOCUMENTATION_URL")
    assert url.startswith("https://github.com/") and "/SlicerOFLSAM2" in url
    assert "['OFLSAM2Slicer developers']" in text
    for placeholder in ("John Doe", "AnyWare", "Firstname Lastname"):
        assert placeholder not in MODULE.read_text(encoding="utf-8")


def test_self_test_never_calls_skip_test(module_tree):
    test = next(n for n in module_tree.body if getattr(n, "name", "") == "OFLSAM2SlicerTest")
    calls = {ast.unparse(n.func) for n in ast.walk(test) if isinstance(n, ast.Call)}
    assert not any(c.endswith("skipTest") for c in calls)  # "Reload and Test": a failure
    assert "self._skip" in calls and "SKIPPED" in ast.unparse(test)


def test_reload_reads_the_packages_again(module_tree):
    reload = ast.unparse(_method(module_tree, "OFLSAM2SlicerWidget", "onReload"))
    assert "forgetPackages()" in reload and "ScriptedLoadableModuleWidget.onReload(self)" in reload


def test_glue_uses_slicer_util_for_node_lists_and_leaves_scene_undo_alone():
    for path in sorted((MODULE_DIR / "oflsam2_slicer").glob("*.py")):
        source = path.read_text(encoding="utf-8")
        assert ".GetNodesByClass(" not in source, f"{path.name}: use slicer.util.getNodesByClass"
        assert "SaveStateForUndo" not in source and "SetUndoEnabled" not in source, path.name


def test_torch_is_never_pip_installed(module_tree):
    for node in ast.walk(module_tree):
        if isinstance(node, ast.Call) and "pip_install" in ast.unparse(node.func):
            assert "torch" not in ast.unparse(node).lower(), ast.unparse(node)
    source = MODULE.read_text(encoding="utf-8")
    assert "installTorch(" in source and "askConfirmation=False" in source


def test_panel_state_names_widgets_of_the_ui(ui_widgets):
    """oflsam2_slicer.panel sets widgets by name: each must exist in the .ui file."""
    from oflsam2_slicer import panel

    tree = ast.parse((MODULE_DIR / "oflsam2_slicer" / "panel.py").read_text(encoding="utf-8"))
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "ui"
    }
    used |= set(panel.INPUT_GROUPS)
    assert used and not sorted(used - set(ui_widgets)), sorted(used - set(ui_widgets))
