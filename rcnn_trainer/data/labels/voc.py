"""Pascal VOC XML: one `<annotation>` file per image, objects with a class `<name>`, a
`<difficult>` flag and a `<bndbox>` of 1-based inclusive pixel corners.

`ann_file` is an `Annotations` folder (every .xml under it), one .xml file, or an
`ImageSets/Main/<split>.txt` id list (the `Annotations` folder is found beside `ImageSets`).
The image is `img_dir/<filename>`; when that file does not exist, the image under img_dir with
the XML's own name (any image suffix) is used. `<size>` gives the image size; when it is missing
or zero the image header is read.

Corners: VOC's (xmin, ymin) = (1, 1) is the top-left pixel and (xmax, ymax) = (W, H) the
bottom-right one, inclusive; in COCO's continuous pixel coordinates that box is [0, 0, W, H], so
xmin and ymin lose 1 and xmax, ymax stay (as detectron2 reads VOC).

The XML is parsed by the standard library's expat parser behind defusedxml: entity declarations
(the "billion laughs" bomb) and external references are refused, the file size and element depth
are bounded (input_limits). Our own code only walks the few elements VOC defines.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree.ElementTree import Element, ParseError

import defusedxml
import defusedxml.ElementTree as SafeET

from rcnn_trainer.data.labels.builder import LabelSet, image_sizes, images_by_stem, leaves_folder, list_files
from rcnn_trainer.data.records import DropReport, RecordPolicy
from rcnn_trainer.errors import UserError
from rcnn_trainer.input_limits import MAX_LABEL_FILE_BYTES, MAX_XML_DEPTH, brief, check_file_size


@dataclass
class VocObject:
    name: str
    where: str  # "object 3 ('dog')"
    corners: list  # [xmin, ymin, xmax, ymax] as floats (1-based), or None with `problem`
    difficult: bool = False
    problem: str = ""


@dataclass
class VocFile:
    path: Path
    image_id: str
    filename: str | None
    size: tuple[int, int] | None  # (width, height) when <size> gives one
    objects: list[VocObject] = field(default_factory=list)


def voc_label_files(ann_file: Path) -> list[tuple[Path, str]]:
    """(xml path, image id) of the split: every .xml of a folder, one .xml, or an id list's files."""
    if ann_file.is_dir():
        return [(p, p.relative_to(ann_file).with_suffix("").as_posix()) for p in list_files(ann_file, (".xml",))]
    if ann_file.suffix.lower() == ".xml":
        return [(ann_file, ann_file.stem)]
    folder = _annotations_beside(ann_file)
    check_file_size(ann_file, MAX_LABEL_FILE_BYTES, "VOC id list")
    files = []
    for number, line in enumerate(ann_file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        words = line.split()
        if not words:
            continue
        image_id = words[0]  # class lists ("000005 -1") carry a flag after the id
        if "/" in image_id or "\\" in image_id or image_id.startswith(".") or "\0" in image_id:
            raise UserError(f"{ann_file}: line {number}: id {brief(image_id)} is not a plain file name (ids name "
                            f"files in '{folder}' and may not hold path separators or start with '.').")
        if len(words) > 1 and words[1] == "-1":
            continue  # a class list's negative: the image does not hold that class
        files.append((folder / f"{image_id}.xml", image_id))
    return files


def _annotations_beside(id_list: Path) -> Path:
    for parent in list(id_list.resolve().parents)[:3]:
        if (parent / "Annotations").is_dir():
            return parent / "Annotations"
    raise UserError(f"'{id_list}' is read as a VOC ImageSets id list, but no 'Annotations' folder was found beside "
                    f"its 'ImageSets' folder (VOCdevkit layout: VOC2007/ImageSets/Main/train.txt with "
                    f"VOC2007/Annotations/). Give the Annotations folder as data.*.ann_file instead.")


def parse_voc(path: Path, image_id: str) -> VocFile:
    """One VOC file; a UserError naming it when it is not well-formed, not VOC or hostile."""
    root = _parse_xml(path)
    if root.tag != "annotation":
        raise UserError(f"{path}: XML that is not Pascal VOC: the root element is <{root.tag[:60]}>, expected "
                        f"<annotation> (set data.*.format if the folder holds another format).")
    size = None
    width, height = root.findtext("size/width"), root.findtext("size/height")
    try:
        values = [float(width), float(height)] if width is not None and height is not None else [0.0, 0.0]
    except ValueError:
        values = None
    if values is None or not all(0 <= v < 1e6 for v in values):  # NaN fails too
        raise UserError(f"{path}: <size> holds width {brief(width)}, height {brief(height)}: expected pixel counts "
                        f"(0 or missing: the image header is read).")
    if min(values) >= 1:
        size = (int(values[0]), int(values[1]))
    filename = (root.findtext("filename") or "").strip() or None
    voc = VocFile(path, image_id, filename, size)
    for number, obj in enumerate(root.iter("object"), 1):
        voc.objects.append(_object(obj, number))
    return voc


def _object(obj: Element, number: int) -> VocObject:
    name = (obj.findtext("name") or "").strip()
    where = f"object {number} ({brief(name)})"
    difficult = (obj.findtext("difficult") or "0").strip() in ("1", "true", "True")
    box = obj.find("bndbox")
    if not name or box is None:
        return VocObject(name, where, None, difficult, "needs a <name> and a <bndbox>")
    texts = [box.findtext(k) for k in ("xmin", "ymin", "xmax", "ymax")]
    try:
        corners = [float(t) for t in texts]
    except (TypeError, ValueError):
        return VocObject(name, where, None, difficult,
                         f"<bndbox> needs numbers xmin, ymin, xmax, ymax; got {brief(texts)}")
    return VocObject(name, where, corners, difficult)


def _parse_xml(path: Path) -> Element:
    check_file_size(path, MAX_LABEL_FILE_BYTES, "VOC annotation file")
    depth = 0
    try:
        for event, element in SafeET.iterparse(str(path), events=("start", "end")):
            depth += 1 if event == "start" else -1
            if depth > MAX_XML_DEPTH:
                raise UserError(f"{path}: the XML nests deeper than {MAX_XML_DEPTH} elements; a VOC file is 4 "
                                f"deep. Refused.")
        return element
    except defusedxml.DefusedXmlException as err:
        raise UserError(f"{path}: the XML declares entities or external references ({type(err).__name__}), "
                        f"which are refused: a VOC file needs neither, and they can expand into gigabytes or "
                        f"read other files.") from None
    except ParseError as err:
        raise UserError(f"{path}: not well-formed XML ({err}).") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot be read ({err}).") from None


def voc_names(ann_file: Path) -> set[str]:
    """The class names of a split, for the category list that two splits share (malformed files are
    skipped: reading that split names them)."""
    names = set()
    for path, image_id in voc_label_files(ann_file):
        try:
            names |= {o.name for o in parse_voc(path, image_id).objects if o.name}
        except (UserError, OSError):
            continue
    return names


def read_voc(ann_file: Path, img_dir: Path, policy: RecordPolicy, report: DropReport,
             other_names: set[str] = frozenset()) -> dict:
    """The split as a COCO dict. Categories: the class names of this split and `other_names` (the
    other split's), sorted, ids 1..K: both splits then number the classes alike."""
    files = parse_split(ann_file)
    names = {o.name for voc in files for o in voc.objects if o.name} | set(other_names)
    labels = LabelSet(policy, report, sorted(names))
    found = _ImageFinder(img_dir)
    for voc in files:
        image_path = found.image_of(voc, labels)
        if image_path is None:
            continue
        size = voc.size or image_sizes([image_path])[0]
        if isinstance(size, str):
            labels.handle("missing_image", voc.path, "<size>", f"no <size> and the image '{image_path}': {size}")
            continue
        image = labels.add_image(voc.image_id, image_path, str(img_dir), *size, voc.path)
        for obj in voc.objects:
            if obj.corners is None:
                raise UserError(f"{voc.path}: {obj.where}: {obj.problem}.")
            cat = labels.category(obj.name, voc.path, obj.where)
            if cat is not None:
                xmin, ymin, xmax, ymax = obj.corners
                labels.add_object(image, cat, [xmin - 1.0, ymin - 1.0, xmax, ymax], voc.path, obj.where,
                                  difficult=obj.difficult)
    return labels.coco()


class _ImageFinder:
    """The image of a VOC file: `img_dir/<filename>`, else `img_dir/<the name part of filename>`,
    else the image under img_dir named like the XML (tools write <filename> with another folder or
    suffix, or an absolute path). A <filename> leading outside img_dir is never read."""

    def __init__(self, img_dir: Path):
        self.img_dir, self._by_stem = img_dir, None

    def image_of(self, voc: VocFile, labels: LabelSet) -> str | None:
        name = voc.filename or ""
        candidates = [str(self.img_dir / name), str(self.img_dir / os.path.basename(name.replace("\\", "/")))]
        unsafe = bool(name) and leaves_folder(str(self.img_dir), candidates[0])
        for path in candidates[unsafe:] if name else []:
            if os.path.isfile(path) and not leaves_folder(str(self.img_dir), path):
                return path
        if self._by_stem is None:
            self._by_stem = images_by_stem(self.img_dir)
        path = self._by_stem.get(voc.image_id) or self._by_stem.get(Path(voc.image_id).name)
        if path:
            return path
        if unsafe:
            labels.handle("unsafe_path", voc.path, "<filename>", f"{brief(name)} leads outside img_dir "
                          f"'{self.img_dir}' (file names are read under img_dir) and no image named "
                          f"'{voc.image_id}.*' is there")
        else:
            labels.handle("missing_image", voc.path, "<filename>", f"a label file without its image: neither "
                          f"'{self.img_dir / (name or '?')}' nor an image named '{voc.image_id}.*' under "
                          f"img_dir exists")
        return None


def parse_split(ann_file: Path) -> list[VocFile]:
    files = voc_label_files(ann_file)
    if not files:
        raise UserError(f"'{ann_file}' holds no VOC .xml file.")
    parsed = []
    for path, image_id in files:
        if not path.is_file():
            raise UserError(f"{ann_file}: the id list names '{image_id}' but '{path}' does not exist.")
        parsed.append(parse_voc(path, image_id))
    return parsed

