"""Ground truth in: masks and boxes read at the image's resolution, placed where preprocessing puts the image, and
paired with their images by the folder and manifest sources."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from medxai.config import PreprocessConfig
from medxai.data import ImageFolderSource, ManifestSource, Record
from medxai.data.ground_truth import (
    LesionBox,
    attach_ground_truth,
    fill_boxes,
    open_ground_truth,
    prepare_masks,
    read_ground_truth,
)
from medxai.data.preprocess import Preprocessor
from medxai.data.sources.base import load_file_record
from medxai.errors import DataError, InvalidImageError


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    image.save(path)
    return str(path)


def _lesion(height: int, width: int, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[rows, cols] = 255
    return mask


# -- reading ---------------------------------------------------------------------------------------------------------
def _mode_1(mask):  # 1-bit PNG
    return Image.fromarray(mask).convert("1")


def _rgb_red(mask):  # a red outline filled on black: only one channel is set
    rgb = np.zeros((*mask.shape, 3), dtype=np.uint8)
    rgb[..., 0] = mask
    return Image.fromarray(rgb)


def _rgba(mask):
    rgba = np.zeros((*mask.shape, 4), dtype=np.uint8)
    rgba[..., :3] = mask[..., None]
    rgba[..., 3] = 255
    return Image.fromarray(rgba)


def _sixteen_bit(mask):
    return Image.fromarray(mask.astype(np.uint16) * 257)


def _zero_one(mask):  # label masks saved as 0/1
    return Image.fromarray((mask > 0).astype(np.uint8))


def _blurred_edges(mask):  # anti-aliased: a 128 ring around the lesion counts, a 100 ring does not
    values = mask.copy()
    values[2, 3:7] = 128
    values[7, 3:7] = 100
    return Image.fromarray(values)


@pytest.mark.parametrize(
    "make, expected_pixels",
    [
        (lambda mask: Image.fromarray(mask), 16),
        (_mode_1, 16),
        (_rgb_red, 16),
        (_rgba, 16),
        (_sixteen_bit, 16),
        (_zero_one, 16),
        (_blurred_edges, 20),
        (lambda mask: Image.fromarray(np.zeros_like(mask)), 0),
    ],
    ids=["L", "1", "RGB-red", "RGBA", "16-bit", "0-1", "antialiased", "empty"],
)
def test_every_png_mode_reads_as_the_drawn_lesion(tmp_path, make, expected_pixels):
    mask = _lesion(10, 12, slice(3, 7), slice(3, 7))  # 4 x 4 = 16 pixels
    path = tmp_path / "mask.png"
    make(mask).save(path)
    truth = read_ground_truth(Record("a.png", 0, masks=(str(path),)), (10, 12, 3))
    assert truth.mask.dtype == bool and truth.mask.shape == (10, 12)
    assert int(truth.mask.sum()) == expected_pixels
    assert not truth.from_boxes
    if expected_pixels == 16:
        np.testing.assert_array_equal(truth.mask, mask > 0)


def test_several_masks_are_unioned(tmp_path):
    first = _save(tmp_path / "a_mask.png", _lesion(10, 10, slice(0, 4), slice(0, 4)))  # 16
    second = _save(tmp_path / "a_mask_1.png", _lesion(10, 10, slice(2, 6), slice(2, 6)))  # 16, 4 shared
    truth = read_ground_truth(Record("a.png", 0, masks=(first, second)), (10, 10))
    assert int(truth.mask.sum()) == 28


def test_a_mask_of_another_size_is_rejected_naming_the_mask_file(tmp_path):
    path = _save(tmp_path / "a_mask.png", _lesion(10, 12, slice(0, 4), slice(0, 4)))
    with pytest.raises(InvalidImageError) as caught:
        read_ground_truth(Record("a.png", 0, masks=(path,)), (12, 10))
    assert caught.value.path == path
    assert caught.value.reason == (
        "mask is 12x10 pixels but its image is 10x12; a mask must have its image's size (it is not resized)"
    )


def test_an_unreadable_mask_is_an_invalid_image_error(tmp_path):
    path = tmp_path / "a_mask.png"
    path.write_bytes(b"not a png")
    with pytest.raises(InvalidImageError) as caught:
        read_ground_truth(Record("a.png", 0, masks=(str(path),)), (10, 10))
    assert caught.value.path == str(path)


def test_no_masks_and_no_boxes_is_no_ground_truth():
    assert read_ground_truth(Record("a.png", 0), (10, 10)) is None


@pytest.mark.parametrize(
    "box, expected_rows, expected_cols",
    [
        (LesionBox(2, 1, 5, 3), (1, 3), (2, 5)),  # integers: columns x0 .. x1 - 1
        (LesionBox(1.4, 0.6, 3.6, 2.5), (1, 2), (1, 4)),  # pixel centres 1.5, 2.5, 3.5 in x; 1.5 in y (2.5 is the end)
        (LesionBox(-3, -3, 2, 2), (0, 2), (0, 2)),  # clipped at the top left
        (LesionBox(8, 6, 20, 20), (6, 8), (8, 10)),  # clipped at the bottom right
        (LesionBox.from_xywh(3, 2, 4, 1), (2, 3), (3, 7)),
    ],
)
def test_a_box_fills_the_pixels_whose_centres_it_holds(box, expected_rows, expected_cols):
    mask = fill_boxes([box], (8, 10))
    expected = np.zeros((8, 10), dtype=bool)
    expected[slice(*expected_rows), slice(*expected_cols)] = True
    np.testing.assert_array_equal(mask, expected)


def test_boxes_make_the_mask_when_there_is_no_mask_file():
    boxes = (LesionBox(0, 0, 3, 2, "Nodule"), LesionBox(2, 1, 4, 4, "Mass"))
    truth = read_ground_truth(Record("a.png", 0, boxes=boxes), (5, 5, 3))
    assert truth.from_boxes and truth.boxes == boxes
    assert int(truth.mask.sum()) == 6 + 6 - 1


@pytest.mark.parametrize("coordinates", [(3, 0, 3, 4), (0, 5, 4, 2), (float("nan"), 0, 1, 1)])
def test_a_box_without_area_is_refused(coordinates):
    with pytest.raises(ValueError):
        LesionBox(*coordinates)


def test_records_with_ground_truth_stay_small_frozen_and_picklable():
    record = Record("a.png", 1, path="/d/a.png", masks=("/d/a_mask.png",), boxes=(LesionBox(0, 0, 1, 1, "x"),))
    assert pickle.loads(pickle.dumps(record)) == record
    with pytest.raises(AttributeError):
        record.masks = ()  # type: ignore[misc]
    assert Record("a.png", 1).masks == () and Record("a.png", 1).boxes == ()


# -- placement in the model input ------------------------------------------------------------------------------------
# A 2x downscale with the antialiased bilinear filter weighs input pixels 2j-1, 2j, 2j+1, 2j+2 by 1/8, 3/8, 3/8, 1/8
# for output pixel j; an object covering input rows 4..7 therefore gives output rows 2 and 3 the value
# (3/8 + 3/8 + 1/8) = 0.875 and rows 1 and 4 the value 1/8, per axis.
@pytest.mark.parametrize(
    "resize_mode, image_size, object_rows, object_cols, expected_rows, expected_cols",
    [
        ("stretch", (16, 16), slice(4, 8), slice(8, 12), (2, 3), (4, 5)),
        ("pad", (8, 16), slice(2, 6), slice(8, 12), (1 + 2, 2 + 2), (4, 5)),  # content 4 x 8, 2 rows of padding on top
        ("pad", (16, 8), slice(8, 12), slice(2, 6), (4, 5), (1 + 2, 2 + 2)),  # 2 columns of padding on the left
    ],
)
def test_a_mask_lands_on_the_model_input_pixels_of_the_drawn_object(
    resize_mode, image_size, object_rows, object_cols, expected_rows, expected_cols
):
    image = _lesion(*image_size, object_rows, object_cols)  # the object is drawn in white on black
    preprocessor = Preprocessor(PreprocessConfig(size=8, channels=1, resize_mode=resize_mode, normalize="none"))
    prepared_image, _ = preprocessor.prepare(image)
    prepared_mask = preprocessor.prepare_mask(image > 0)

    assert prepared_mask.shape == (8, 8) and prepared_mask.dtype == torch.float32
    torch.testing.assert_close(prepared_mask, prepared_image[0], rtol=0, atol=1e-6)
    core = prepared_mask[expected_rows[0] : expected_rows[1] + 1, expected_cols[0] : expected_cols[1] + 1]
    torch.testing.assert_close(core, torch.full((2, 2), 0.875 * 0.875), rtol=0, atol=1e-6)
    hottest = divmod(int(prepared_mask.argmax()), 8)
    assert expected_rows[0] <= hottest[0] <= expected_rows[1] and expected_cols[0] <= hottest[1] <= expected_cols[1]


def test_prepare_masks_places_each_records_ground_truth_and_flags_who_has_some(tmp_path):
    image = _lesion(16, 16, slice(4, 8), slice(8, 12))
    with_mask = _save(tmp_path / "a" / "x.png", image)
    mask = _save(tmp_path / "a" / "x_mask.png", image)
    plain = _save(tmp_path / "b" / "y.png", image)
    boxed = _save(tmp_path / "b" / "z.png", image)
    bad = _save(tmp_path / "a" / "w.png", np.zeros((10, 10), dtype=np.uint8))
    records = [
        Record("a/x.png", 0, path=with_mask, masks=(mask,)),
        Record("b/y.png", 1, path=plain),
        Record("b/z.png", 1, path=boxed, boxes=(LesionBox(8, 4, 12, 8),)),
        Record("a/w.png", 0, path=bad, masks=(mask,)),  # 16 x 16 mask on a 10 x 10 image
    ]
    source = SimpleNamespace(load=load_file_record)  # prepare_masks only decodes through the source
    preprocessor = Preprocessor(PreprocessConfig(size=8, channels=1, normalize="none"))
    skipped: list[tuple[str, str]] = []

    masks, has_ground_truth = prepare_masks(source, records, preprocessor, skipped)

    assert masks.shape == (4, 8, 8) and masks.dtype == torch.float32
    assert has_ground_truth.tolist() == [True, False, True, False]
    expected = preprocessor.prepare_mask(image > 0)
    torch.testing.assert_close(masks[0], expected)
    torch.testing.assert_close(masks[2], expected)  # the box covers the same pixels as the mask
    assert float(masks[1].abs().sum()) == 0 and float(masks[3].abs().sum()) == 0
    assert skipped == [(mask, "mask is 16x16 pixels but its image is 10x10; a mask must have its image's size "
                              "(it is not resized)")]


# -- folder layouts --------------------------------------------------------------------------------------------------
def _tree(root: Path, files: list[str]) -> Path:
    """Tiny PNG files at the given relative paths (their pixels do not matter for listing)."""
    for relative in files:
        _save(root / relative, np.zeros((4, 4), dtype=np.uint8))
    return root


def _pairs(source) -> dict[str, list[str]]:
    return {record.id: [Path(mask).relative_to(source.root).as_posix() for mask in record.masks]
            for record in source.records()}


def _skipped(source) -> list[tuple[str, str]]:
    return [(Path(path).relative_to(source.root).as_posix(), reason) for path, reason in source.skipped]


_NO_IMAGE_BESIDE = "mask file without its image: no image named {!r} beside it"
_NO_IMAGE_MIRRORED = "mask file without its image: no image named {!r} in the folder it mirrors"

FOLDER_LAYOUTS = {
    "busi as downloaded": (
        ["benign/benign (1).png", "benign/benign (1)_mask.png", "benign/benign (4).png", "benign/benign (4)_mask.png",
         "benign/benign (4)_mask_1.png", "normal/normal (1).png", "normal/normal (1)_mask.png"],
        ["benign", "normal"],
        {"benign/benign (1).png": ["benign/benign (1)_mask.png"],
         "benign/benign (4).png": ["benign/benign (4)_mask.png", "benign/benign (4)_mask_1.png"],
         "normal/normal (1).png": ["normal/normal (1)_mask.png"]},
        [],
    ),
    "every suffix, any case, other image formats": (
        ["a/p.png", "a/p_seg.png", "a/q.jpg", "a/q-mask.png", "a/r.png", "a/r_Label.png", "b/s.png", "b/s_MASK_2.png",
         "b/t.png"],
        ["a", "b"],
        {"a/p.png": ["a/p_seg.png"], "a/q.jpg": ["a/q-mask.png"], "a/r.png": ["a/r_Label.png"],
         "b/s.png": ["b/s_MASK_2.png"], "b/t.png": []},
        [],
    ),
    "masks folder beside the class folders": (
        ["a/x.png", "a/y.png", "b/z.png", "masks/a/x.png", "masks/b/z_mask.png", "masks/b/gone.png"],
        ["a", "b"],
        {"a/x.png": ["masks/a/x.png"], "a/y.png": [], "b/z.png": ["masks/b/z_mask.png"]},
        [("masks/b/gone.png", _NO_IMAGE_MIRRORED.format("gone"))],
    ),
    "segmentations folder inside each class folder": (
        ["a/x.png", "a/Segmentations/x.png", "b/z.png", "b/segmentations/z_seg.png"],
        ["a", "b"],
        {"a/x.png": ["a/Segmentations/x.png"], "b/z.png": ["b/segmentations/z_seg.png"]},
        [],
    ),
    "masks folder in split folders": (
        ["train/a/x.png", "train/b/y.png", "train/masks/a/x.png", "test/a/u.png", "test/b/v.png",
         "test/masks/b/v.png"],
        ["a", "b"],
        {"test/a/u.png": [], "test/b/v.png": ["test/masks/b/v.png"], "train/a/x.png": ["train/masks/a/x.png"],
         "train/b/y.png": []},
        [],
    ),
    "a mask whose image is missing is skipped, not read as an image": (
        ["a/x.png", "a/x_mask.png", "a/y_mask.png", "b/z.png"],
        ["a", "b"],
        {"a/x.png": ["a/x_mask.png"], "b/z.png": []},
        [("a/y_mask.png", _NO_IMAGE_BESIDE.format("y"))],
    ),
    "mask-like names that pair nothing stay images": (
        ["label/x_label.png", "label/y.png", "masks/m_mask.png", "masks/n.png", "other/w_seg.png"],
        ["label", "masks", "other"],
        {"label/x_label.png": [], "label/y.png": [], "masks/m_mask.png": [], "masks/n.png": [],
         "other/w_seg.png": []},
        [],
    ),
}


@pytest.mark.parametrize("files, classes, pairs, skipped", FOLDER_LAYOUTS.values(), ids=FOLDER_LAYOUTS.keys())
def test_folder_layouts_pair_masks_with_their_images(tmp_path, files, classes, pairs, skipped):
    source = ImageFolderSource(_tree(tmp_path, files))
    assert source.label_names == classes
    assert _pairs(source) == pairs
    assert _skipped(source) == skipped
    listed_masks = sum(len(masks) for masks in pairs.values())
    assert len(pairs) + listed_masks + len(skipped) == len(files)  # nothing lost
    if listed_masks or skipped:
        with_masks = sum(1 for masks in pairs.values() if masks)
        assert source.layout["masks"]["images_with_masks"] == with_masks
        assert source.layout["masks"]["images_without_masks"] == len(pairs) - with_masks
        assert source.layout["masks"]["masks_without_image"] == len(skipped)
        assert source.layout["masks"]["mask_files"] == listed_masks + len(skipped)
        assert source.layout["masks"]["missing_mask_files"] == 0
    else:
        assert "masks" not in source.layout


def test_a_class_folder_holding_only_masks_is_an_error(tmp_path):
    _tree(tmp_path, ["a/x.png", "a/x_mask.png", "b/y_mask.png"])
    with pytest.raises(DataError, match="has only mask files"):
        ImageFolderSource(tmp_path)


def test_masks_change_the_fingerprint_and_data_without_masks_keeps_it(tmp_path):
    plain = ImageFolderSource(_tree(tmp_path / "plain", ["a/x.png", "b/y.png"])).fingerprint()
    masked_root = _tree(tmp_path / "masked", ["a/x.png", "b/y.png", "a/x_mask.png"])
    masked = ImageFolderSource(masked_root).fingerprint()
    (masked_root / "a" / "x_mask.png").write_bytes(b"0" * 10)  # another mask (size) of the same image
    assert len({plain, masked, ImageFolderSource(masked_root).fingerprint()}) == 3
    unmasked = ImageFolderSource(_tree(tmp_path / "again", ["a/x.png", "b/y.png"])).fingerprint()
    assert unmasked == plain


@pytest.mark.realdata
def test_busi_as_downloaded_reads_three_classes_with_every_image_paired(data_dir):
    source = ImageFolderSource(data_dir / "busi_subset")
    records = source.records()
    assert source.label_names == ["benign", "malignant", "normal"]
    assert [sum(1 for record in records if record.label == label) for label in range(3)] == [100, 100, 20]
    assert all(record.masks for record in records)
    assert sum(len(record.masks) for record in records) == 230
    assert not any("_mask" in record.id for record in records)
    assert source.layout["masks"] == {"paired_by": ["<image>_mask* beside the image"], "mask_files": 230,
                                      "images_with_masks": 220, "images_with_boxes": 0, "images_without_masks": 0,
                                      "masks_without_image": 0, "missing_mask_files": 0}
    assert [reason for _, reason in source.skipped] == ["not inside a class folder"] * 3  # MD5SUMS, README, labels.csv


# -- manifests and ground truth kept apart -----------------------------------------------------------------------------
def _manifest(tmp_path: Path, text: str) -> Path:
    for name in ("a.png", "b.png", "c.png"):
        _save(tmp_path / name, np.zeros((10, 10), dtype=np.uint8))
    _save(tmp_path / "m" / "a_mask.png", _lesion(10, 10, slice(0, 4), slice(0, 4)))
    _save(tmp_path / "m" / "a_mask_1.png", _lesion(10, 10, slice(2, 6), slice(2, 6)))
    path = tmp_path / "manifest.csv"
    path.write_text(text.replace("ABS", str(tmp_path)))
    return path


@pytest.mark.parametrize(
    "text, masks, boxes",
    [
        ("path,label,mask\na.png,x,m/a_mask.png|m/a_mask_1.png\nb.png,y,\nc.png,x,ABS/m/a_mask.png\n",
         {"a.png": ["m/a_mask.png", "m/a_mask_1.png"], "b.png": [], "c.png": ["m/a_mask.png"]}, {}),
        ("path,label,x0,y0,x1,y1,finding\na.png,x,1,2,5,6,Mass\nb.png,y,,,,,\nc.png,x,0,0,2.5,3,\n",
         {"a.png": [], "b.png": [], "c.png": []}, {"a.png": [LesionBox(1, 2, 5, 6, "Mass")],
                                                  "c.png": [LesionBox(0, 0, 2.5, 3)]}),
        ("path,label,masks,bbox_x,bbox_y,bbox_w,bbox_h\na.png,x,m/a_mask.png,1,2,4,4\nb.png,y,,,,,\nc.png,x,,,,,\n",
         {"a.png": ["m/a_mask.png"], "b.png": [], "c.png": []}, {"a.png": [LesionBox(1, 2, 5, 6)]}),
    ],
    ids=["mask column", "corner box columns", "masks and x,y,w,h"],
)
def test_a_manifest_carries_masks_and_boxes(tmp_path, text, masks, boxes):
    source = ManifestSource(_manifest(tmp_path, text))
    records = {record.id: record for record in source.records()}
    assert {key: [Path(mask).relative_to(tmp_path).as_posix() for mask in record.masks]
            for key, record in records.items()} == masks
    assert {key: list(record.boxes) for key, record in records.items() if record.boxes} == boxes
    assert source.layout["masks"]["images_with_masks"] == sum(1 for paths in masks.values() if paths)
    assert source.layout["masks"]["images_with_boxes"] == len(boxes)


def test_a_manifests_unioned_masks_give_the_pixel_count(tmp_path):
    source = ManifestSource(_manifest(tmp_path, "path,label,mask\na.png,x,m/a_mask.png|m/a_mask_1.png\nb.png,y,\n"))
    truth = read_ground_truth(source.records()[0], source.load(source.records()[0]).image.shape)
    assert int(truth.mask.sum()) == 16 + 16 - 4


@pytest.mark.parametrize(
    "row, message",
    [("a.png,x,1,2,,6", r"line 2: box cells \['1', '2', '', '6'\] are not four numbers"),
     ("a.png,x,5,2,5,6", r"line 2: box \(5.0, 2.0, 5.0, 6.0\) has no area")],
)
def test_a_manifests_bad_box_names_the_line(tmp_path, row, message):
    with pytest.raises(DataError, match=message):
        ManifestSource(_manifest(tmp_path, f"path,label,x0,y0,x1,y1\n{row}\nb.png,y,,,,\n"))


# The header as NIH ships BBox_List_2017.csv (its bracketed column name splits into four, plus three empty names);
# the first two rows are NIH's own first rows.
NIH_BOXES = (
    "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
    "00013118_008.png,Atelectasis,225.084745762712,547.019216763771,86.7796610169491,79.1864406779661\n"
    "00014716_007.png,Atelectasis,686.101694915254,131.543498898458,185.491525423729,313.491525423729\n"
    "00013118_008.png,Effusion,10,20,30,40\n"
)


def test_nih_bbox_list_is_read_as_shipped_and_attached_by_file_name(tmp_path):
    path = tmp_path / "BBox_List_2017.csv"
    path.write_text(NIH_BOXES)
    table = open_ground_truth(path)
    assert table.keys() == ["00013118_008.png", "00014716_007.png"] and table.masks == {} and table.skipped == []
    assert table.boxes["00013118_008.png"] == (
        LesionBox(225.084745762712, 547.019216763771, 225.084745762712 + 86.7796610169491,
                  547.019216763771 + 79.1864406779661, "Atelectasis"),
        LesionBox(10, 20, 40, 60, "Effusion"),
    )
    records = [Record("images/00013118_008.png", 1), Record("images/00000001_000.png", 0)]
    attached = attach_ground_truth(records, table)
    assert [len(record.boxes) for record in attached] == [2, 0]
    assert [box.label for box in attached[0].boxes] == ["Atelectasis", "Effusion"]
    assert table.match(records)[1] == ["00014716_007.png"]  # no such image: reported, not attached
    truth = read_ground_truth(attached[0], (1024, 1024))
    assert truth.from_boxes and int(truth.mask.sum()) == 87 * 79 + 30 * 40  # centres in [225.08, 311.86) x ...


def test_a_mask_folder_apart_pairs_by_stem_and_unions(tmp_path):
    masks = tmp_path / "gt"
    _save(masks / "x.png", _lesion(10, 10, slice(0, 4), slice(0, 4)))
    _save(masks / "sub" / "x_mask_1.png", _lesion(10, 10, slice(2, 6), slice(2, 6)))
    _save(masks / "orphan.png", _lesion(10, 10, slice(0, 1), slice(0, 1)))
    records = [Record("a/x.png", 0), Record("b/y.jpg", 1)]
    table = open_ground_truth(masks)
    attached = attach_ground_truth(records, table)
    assert [len(record.masks) for record in attached] == [2, 0]
    assert table.match(records)[1] == ["orphan"]
    assert int(read_ground_truth(attached[0], (10, 10)).mask.sum()) == 28


def test_a_ground_truth_key_matching_two_images_is_not_attached(tmp_path):
    path = tmp_path / "gt.csv"
    path.write_text("image,x0,y0,x1,y1\nx.png,0,0,1,1\na/y.png,0,0,2,2\n")
    records = [Record("a/x.png", 0), Record("b/x.png", 1), Record("a/y.png", 0)]
    attached = attach_ground_truth(records, open_ground_truth(path))
    assert [len(record.boxes) for record in attached] == [0, 0, 1]
    assert open_ground_truth(path).match(records)[1] == ["x.png"]


def test_a_ground_truth_csv_without_image_or_ground_truth_columns_is_refused(tmp_path):
    path = tmp_path / "gt.csv"
    path.write_text("name,score\nx.png,1\n")
    with pytest.raises(DataError, match="line 1: expected an image column"):
        open_ground_truth(path)


# -- check-data --------------------------------------------------------------------------------------------------------
def test_check_data_reports_how_masks_were_paired(tmp_path, capsys):
    import json

    from medxai.cli import main

    root = tmp_path / "data"
    _save(root / "a" / "x.png", np.full((10, 10), 40, dtype=np.uint8))
    _save(root / "a" / "x_mask.png", _lesion(10, 10, slice(0, 4), slice(0, 5)))
    _save(root / "a" / "y.png", np.full((10, 12), 90, dtype=np.uint8))
    _save(root / "a" / "y_mask.png", _lesion(10, 10, slice(0, 4), slice(0, 5)))  # another size
    _save(root / "a" / "gone_mask.png", _lesion(10, 10, slice(0, 4), slice(0, 5)))  # no image
    _save(root / "b" / "z.png", np.full((10, 10), 160, dtype=np.uint8))
    _save(root / "b" / "z_mask.png", np.zeros((10, 10), dtype=np.uint8))  # a normal image's empty mask
    _save(root / "b" / "w.png", np.full((10, 10), 220, dtype=np.uint8))  # no mask

    assert main(["check-data", str(root), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    truth = result["ground_truth"]
    assert result["files"] == 4 and result["splits"]["all"]["n"] == 4
    assert {key: truth[key] for key in ("images_with_masks", "images_without_masks", "masks_without_image",
                                        "mask_files", "with_lesion", "empty_masks")} == {
        "images_with_masks": 3, "images_without_masks": 1, "masks_without_image": 1, "mask_files": 4,
        "with_lesion": 1, "empty_masks": 1}
    assert truth["paired_by"] == ["<image>_mask* beside the image"]
    assert truth["images_without_masks_list"] == ["b/w.png"]
    assert [Path(entry["file"]).name for entry in truth["masks_without_image_list"]] == ["gone_mask.png"]
    assert [(entry["image"], Path(entry["file"]).name, entry["reason"]) for entry in truth["unusable"]] == [
        ("a/y.png", "y_mask.png", "mask is 10x10 pixels but its image is 12x10; a mask must have its image's size "
                                  "(it is not resized)")]

    assert main(["check-data", str(root)]) == 0
    printed = capsys.readouterr().out
    assert "masks: 3 images with masks, 1 without, 1 mask files without an image (skipped)" in printed
    for title in ("mask files without an image (first 1 of 1)", "images without a mask (first 1 of 1)",
                  "masks that cannot be used (first 1 of 1)"):
        assert title in printed
