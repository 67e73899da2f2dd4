"""Reading and writing MRML nodes: volume and segment arrays, exact geometry, undoable writes, export.

Everything that touches a node's content lives here; the rest of the glue works on arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import slicer
import vtk

from oflsam2.files import atomic_path
from oflsam2.volume import Geometry

from .errors import OFLSAM2UserError

# One-file formats only: a detached header (.nhdr, .mhd) names its data file, which an
# atomic write (temporary name, then rename) would leave pointing at the temporary name.
LABELMAP_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")
EXPORT_NODE_NAME = "__oflsam2_export__"
MAX_SEGMENTS = 255  # one uint8 label per segment

# ---------------------------------------------------------------- reading


def ijkToRasArray(node: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    """The node's own IJK-to-RAS matrix as a 4x4 array (parent transforms not applied)."""
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def requireInputs(
    volumeNode: slicer.vtkMRMLScalarVolumeNode | None,
    segmentationNode: slicer.vtkMRMLSegmentationNode | None,
) -> None:
    if volumeNode is None:
        raise OFLSAM2UserError("No input volume: select the volume you painted on")
    if segmentationNode is None:
        raise OFLSAM2UserError(
            "No segmentation: select the segmentation holding your painted slices"
        )


def _dimensions(volumeNode: slicer.vtkMRMLScalarVolumeNode) -> tuple[int, int, int]:
    """The image's dimensions (i, j, k), or a one-line user error for what is not a 3D scalar."""
    name = volumeNode.GetName()
    image = volumeNode.GetImageData()
    if image is None:
        raise OFLSAM2UserError(f"Volume '{name}' holds no image data: load it again")
    components = image.GetNumberOfScalarComponents()
    if components != 1:
        raise OFLSAM2UserError(
            f"Volume '{name}' is 4D ({components} values per voxel): choose a scalar 3D volume"
        )
    dims = tuple(int(d) for d in image.GetDimensions())
    if min(dims) < 2:
        size = " x ".join(str(d) for d in dims if d > 1) or "1"
        raise OFLSAM2UserError(
            f"Volume '{name}' is 2D ({size}): propagation needs a 3D volume with several slices"
        )
    return dims


def volumeInput(
    volumeNode: slicer.vtkMRMLScalarVolumeNode | None,
) -> tuple[np.ndarray, Geometry]:
    """A private copy of the voxels (k, j, i) and the exact grid, or a one-line user error."""
    if volumeNode is None:
        raise OFLSAM2UserError("No input volume: select the volume you painted on")
    dims = _dimensions(volumeNode)
    array = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)
    if array.ndim != 3:
        raise OFLSAM2UserError(
            f"Volume '{volumeNode.GetName()}' is {array.ndim}D: choose a scalar 3D volume"
        )
    checkFinite(array, volumeNode.GetName())
    return array, Geometry.from_ijk_to_ras(ijkToRasArray(volumeNode), dims)


def checkFinite(array: np.ndarray, name: str) -> None:
    """A user error naming the count of NaN or infinite voxels, if there are any."""
    if not np.issubdtype(array.dtype, np.floating):
        return
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise OFLSAM2UserError(
            f"Volume '{name}' has {bad} of {array.size} voxels that are not a number (NaN or "
            "infinite): replace them (e.g. Filtering > Simple Filters, or threshold them away) "
            "and press Propagate again"
        )


def volumeSource(volumeNode: slicer.vtkMRMLScalarVolumeNode) -> tuple:
    """What a copy of the voxels depends on: the image data's modification time and the grid."""
    image = volumeNode.GetImageData()
    return (
        image.GetMTime() if image is not None else None,
        tuple(ijkToRasArray(volumeNode).ravel()),
    )


def _segmentIds(segmentationNode: slicer.vtkMRMLSegmentationNode) -> list[str]:
    segmentation = segmentationNode.GetSegmentation()
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def _visibleSegmentIds(
    segmentationNode: slicer.vtkMRMLSegmentationNode, ids: list[str]
) -> list[str]:
    display = segmentationNode.GetDisplayNode()
    visible = [s for s in ids if display is None or display.GetSegmentVisibility(s)]
    if not visible:
        raise OFLSAM2UserError(
            f"No segment of '{segmentationNode.GetName()}' is visible: show the segments to propagate"
        )
    return visible


def _editorSelection(
    segmentationNode: slicer.vtkMRMLSegmentationNode, ids: list[str]
) -> str | None:
    """The segment a Segment Editor has selected in this segmentation, or None."""
    scene = segmentationNode.GetScene()
    if scene is None:
        return None
    for editor in slicer.util.getNodesByClass("vtkMRMLSegmentEditorNode", scene):
        selected = editor.GetSelectedSegmentID()
        if editor.GetSegmentationNode() is segmentationNode and selected in ids:
            return selected
    return None


def defaultSegmentIds(
    segmentationNode: slicer.vtkMRMLSegmentationNode | None, allVisible: bool = False
) -> list[str]:
    """All visible segments, or the segment selected in a Segment Editor, or the first one."""
    if segmentationNode is None:
        raise OFLSAM2UserError(
            "No segmentation: select the segmentation holding your painted slices"
        )
    ids = _segmentIds(segmentationNode)
    if not ids:
        raise OFLSAM2UserError(
            f"Segmentation '{segmentationNode.GetName()}' has no segments: add one in the "
            "Segment Editor and paint a few slices"
        )
    if allVisible:
        return _visibleSegmentIds(segmentationNode, ids)
    selected = _editorSelection(segmentationNode, ids)
    return [selected] if selected is not None else ids[:1]


def segmentNames(
    segmentationNode: slicer.vtkMRMLSegmentationNode, segmentIds: Iterable[str] | None
) -> dict[str, str]:
    """The chosen segments (default: :func:`defaultSegmentIds`) and their names, in order."""
    ids = list(segmentIds) if segmentIds else defaultSegmentIds(segmentationNode)
    if len(set(ids)) != len(ids):
        raise OFLSAM2UserError("The same segment was chosen twice")
    if len(ids) > MAX_SEGMENTS:
        raise OFLSAM2UserError(
            f"{len(ids)} segments chosen: propagate at most {MAX_SEGMENTS} at a time"
        )
    segmentation = segmentationNode.GetSegmentation()
    names: dict[str, str] = {}
    for sid in ids:
        segment = segmentation.GetSegment(sid)
        if segment is None:
            raise OFLSAM2UserError(
                f"Segmentation '{segmentationNode.GetName()}' has no segment '{sid}': choose another segment"
            )
        names[sid] = segment.GetName()
    return names


def segmentMask(
    segmentationNode: slicer.vtkMRMLSegmentationNode,
    segmentId: str,
    volumeNode: slicer.vtkMRMLScalarVolumeNode,
) -> np.ndarray:
    """The segment as a 0/1 uint8 array on the volume's grid (resampled by Slicer if needed).

    Like ``slicer.util.arrayFromSegmentBinaryLabelmap``, but leaves no node behind (that one
    leaves the temporary label map's display node in the scene).
    """
    scene = segmentationNode.GetScene()
    if scene is None:
        array = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
        return (np.asarray(array) > 0).astype(np.uint8)
    temporary: list = []
    try:
        node = _exportLabelmap(scene, segmentationNode, [segmentId], volumeNode, temporary)
        return (np.asarray(slicer.util.arrayFromVolume(node)) > 0).astype(np.uint8)
    finally:
        removeNodes(scene, temporary)


def _exportLabelmap(
    scene: slicer.vtkMRMLScene,
    segmentationNode: slicer.vtkMRMLSegmentationNode,
    segmentIds: Sequence[str],
    volumeNode: slicer.vtkMRMLScalarVolumeNode,
    temporary: list,
) -> slicer.vtkMRMLLabelMapVolumeNode:
    """A temporary label map node (segment i = label i + 1) on the volume's grid.

    It and what the export adds (its display node, a "<segmentation>_ColorTable" node) are
    appended to ``temporary`` for :func:`removeNodes`.
    """
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", EXPORT_NODE_NAME)
    temporary.append(node)
    names = vtk.vtkStringArray()
    for sid in segmentIds:
        names.InsertNextValue(sid)
    logic = slicer.modules.segmentations.logic()
    before = {n.GetID() for n in slicer.util.getNodesByClass("vtkMRMLColorNode", scene)}
    exported = logic.ExportSegmentsToLabelmapNode(segmentationNode, names, node, volumeNode)
    display = node.GetDisplayNode()
    colors = display.GetColorNode() if display is not None else None
    if colors is not None and colors.GetID() not in before:
        temporary.insert(0, colors)
    if not exported:
        raise OFLSAM2UserError("Slicer could not export the segments to a label map")
    return node


def writeSegmentMask(
    segmentationNode: slicer.vtkMRMLSegmentationNode,
    segmentId: str,
    volumeNode: slicer.vtkMRMLScalarVolumeNode,
    mask: np.ndarray,
) -> None:
    """Replace a segment's voxels by ``mask`` (0/1 on the volume's grid), leaving no node behind.

    What ``slicer.util.updateSegmentBinaryLabelmapFromArray`` does, but its temporary label
    map's display node is removed too.
    """
    scene = segmentationNode.GetScene()
    volumes = slicer.modules.volumes.logic()
    node = volumes.CreateAndAddLabelVolume(scene, volumeNode, EXPORT_NODE_NAME)
    try:
        slicer.util.updateVolumeFromArray(node, (np.asarray(mask) > 0).astype(np.uint8))
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segmentId)
        logic = slicer.modules.segmentations.logic()
        if not logic.ImportLabelmapToSegmentationNode(node, segmentationNode, ids):
            raise RuntimeError(f"Slicer could not write segment {segmentId}")
    finally:
        removeNodes(scene, [node])


def removeNodes(scene: slicer.vtkMRMLScene, nodes: Sequence) -> None:
    """Remove temporary nodes (last added first) and their display nodes from ``scene``."""
    for node in reversed(nodes):
        display = node.GetDisplayNode() if hasattr(node, "GetDisplayNode") else None
        if display is not None:
            scene.RemoveNode(display)
        scene.RemoveNode(node)


def paintedMasks(
    segmentationNode: slicer.vtkMRMLSegmentationNode,
    names: Mapping[str, str],
    volumeNode: slicer.vtkMRMLScalarVolumeNode,
    shape: tuple[int, ...],
) -> dict[str, np.ndarray]:
    """Each segment on the volume's grid; a user error for one that is empty."""
    masks = {sid: segmentMask(segmentationNode, sid, volumeNode) for sid in names}
    for sid, mask in masks.items():
        # Slicer resamples onto the reference volume, so this only guards against surprises.
        if mask.shape != shape:
            raise OFLSAM2UserError(
                f"Segment '{names[sid]}' could not be resampled onto the volume's grid"
            )
        if not mask.any():
            raise OFLSAM2UserError(
                f"Segment '{names[sid]}' has no painted slice: paint it on a few slices first"
            )
    return masks


# ---------------------------------------------------------------- writing


def checkUnchanged(
    segmentationNode: slicer.vtkMRMLSegmentationNode,
    volumeNode: slicer.vtkMRMLScalarVolumeNode,
    names: Mapping[str, str],
    originals: Mapping[str, np.ndarray],
) -> None:
    """Nodes and segments are still there and as they were read: else nothing may be written."""
    if segmentationNode.GetScene() is None or volumeNode.GetScene() is None:
        raise OFLSAM2UserError(
            "The volume or segmentation was removed while propagating: nothing was written"
        )
    segmentation = segmentationNode.GetSegmentation()
    for sid, name in names.items():
        if segmentation.GetSegment(sid) is None:
            raise OFLSAM2UserError(
                f"Segment '{name}' was deleted while propagating: nothing was written"
            )
        if not np.array_equal(segmentMask(segmentationNode, sid, volumeNode), originals[sid]):
            raise OFLSAM2UserError(
                f"Segment '{name}' was edited while propagating: nothing was written; "
                "press Propagate again"
            )


def writeSegments(
    segmentationNode: slicer.vtkMRMLSegmentationNode,
    volumeNode: slicer.vtkMRMLScalarVolumeNode,
    masks: Mapping[str, np.ndarray],
    history: slicer.vtkSegmentationHistory,
    beforeWrite: Callable[[], None] | None = None,
) -> None:
    """Write ``masks`` into their segments, undoably, and mark them "in progress".

    Saves undo states first: ``beforeWrite`` (e.g. the Segment Editor's own undo), then
    ``history`` (the logic's own segmentation history). The scene's undo is left alone: it
    is off in Slicer by default, and switching it on here would only leave a side effect.
    """
    if not masks:
        return
    if beforeWrite is not None:
        beforeWrite()
    history.SaveState()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    segmentation = segmentationNode.GetSegmentation()
    was = segmentationNode.StartModify()
    try:
        for sid, mask in masks.items():
            writeSegmentMask(segmentationNode, sid, volumeNode, mask)
            logic.SetSegmentStatus(segmentation.GetSegment(sid), logic.InProgress)
    finally:
        segmentationNode.EndModify(was)


# ---------------------------------------------------------------- export


def _segmentationCopy(
    scene: slicer.vtkMRMLScene,
    segmentationNode: slicer.vtkMRMLSegmentationNode,
    segmentIds: Sequence[str],
    volumeNode: slicer.vtkMRMLScalarVolumeNode,
    temporary: list,
) -> tuple[slicer.vtkMRMLSegmentationNode, slicer.vtkMRMLStorageNode]:
    """A temporary segmentation node with the segments on the volume's grid, and its storage."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", EXPORT_NODE_NAME)
    temporary.append(node)
    node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    source = segmentationNode.GetSegmentation()
    for sid in segmentIds:
        segment = source.GetSegment(sid)
        if segment is None:
            raise OFLSAM2UserError(f"Segmentation has no segment '{sid}'")
        node.GetSegmentation().AddEmptySegment(sid, segment.GetName(), segment.GetColor())
        writeSegmentMask(node, sid, volumeNode, segmentMask(segmentationNode, sid, volumeNode))
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetCropToMinimumExtent(False)
    return node, storage


def _labelmapCopy(
    scene: slicer.vtkMRMLScene,
    segmentationNode: slicer.vtkMRMLSegmentationNode,
    segmentIds: Sequence[str],
    volumeNode: slicer.vtkMRMLScalarVolumeNode,
    temporary: list,
) -> tuple[slicer.vtkMRMLLabelMapVolumeNode, slicer.vtkMRMLStorageNode]:
    """A temporary label map node (segment i = label i + 1) on the volume's grid, and its storage."""
    node = _exportLabelmap(scene, segmentationNode, segmentIds, volumeNode, temporary)
    return node, slicer.vtkMRMLVolumeArchetypeStorageNode()


def exportTarget(path: str) -> tuple[Path, Callable]:
    """The file to write and the function that builds its temporary node, by suffix."""
    target = Path(path).expanduser()
    if not target.parent.is_dir():
        raise OFLSAM2UserError(f"Folder {target.parent} does not exist: choose an existing folder")
    lower = target.name.lower()
    if lower.endswith(".seg.nrrd"):
        return target, _segmentationCopy
    if lower.endswith(LABELMAP_SUFFIXES):
        return target, _labelmapCopy
    raise OFLSAM2UserError(
        f"Cannot tell the format of '{target.name}': use .seg.nrrd, .nii.gz, .nii, .nrrd or .mha"
    )


def _writeAtomically(storage: slicer.vtkMRMLStorageNode, node, target: Path) -> None:
    """Write through a temporary file beside ``target``: a failed write leaves no half file."""
    try:
        with atomic_path(target) as tmp:
            storage.SetFileName(str(tmp))
            if not storage.WriteData(node):
                raise OFLSAM2UserError(
                    f"Could not write {target}: check the folder is writable and has space"
                )
    except OSError as exc:
        raise OFLSAM2UserError(
            f"Could not write {target}: {exc.strerror or exc}; check the folder is writable"
        ) from None
    finally:
        storage.SetFileName(str(target))


def exportSegments(
    segmentationNode: slicer.vtkMRMLSegmentationNode,
    segmentIds: Sequence[str],
    volumeNode: slicer.vtkMRMLScalarVolumeNode,
    path: str,
) -> str:
    """Save segments on the volume's exact grid through Slicer's own storage nodes.

    ``.seg.nrrd``: a Slicer segmentation (names, colours, one label per segment).
    ``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha``: a label map, segment i = label i+1.
    The file is written whole or not at all: an existing file is replaced only on success.
    """
    target, copy = exportTarget(path)
    scene = segmentationNode.GetScene()
    temporary: list = []
    try:
        node, storage = copy(scene, segmentationNode, segmentIds, volumeNode, temporary)
        scene.AddNode(storage)
        temporary.append(storage)
        _writeAtomically(storage, node, target)
    finally:
        removeNodes(scene, temporary)
    return str(target)
