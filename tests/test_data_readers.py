"""Readers: .pts (with/without header, wrong count, NaN), WFLW lines, images, folder scans."""
import os

import numpy as np
from PIL import Image
import pytest

from data_pipelines import readers
from data_pipelines import sources

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def _pts_text(points, header=True):
  body = "\n".join(f"{x} {y}" for x, y in points)
  if header:
    return f"version: 1\nn_points: {len(points)}\n{{\n{body}\n}}\n"
  return body + "\n"


def test_pts_with_header_is_one_based(tmp_path):
  pts = np.arange(136, dtype=np.float64).reshape(68, 2) + 1.0
  p = tmp_path / "a.pts"
  p.write_text(_pts_text(pts))
  out = readers.read_pts(str(p), 68)
  assert out.dtype == np.float32 and out.shape == (68, 2)
  np.testing.assert_allclose(out, pts - 1.0)


def test_pts_without_header(tmp_path):
  pts = np.random.default_rng(0).uniform(1, 100, (68, 2))
  p = tmp_path / "b.pts"
  p.write_text(_pts_text(pts, header=False))
  np.testing.assert_allclose(readers.read_pts(str(p), 68), pts - 1.0, atol=1e-4)


def test_pts_roundtrip(tmp_path):
  pts = np.random.default_rng(1).uniform(0, 100, (98, 2)).astype(np.float32)
  readers.write_pts(str(tmp_path / "c.pts"), pts)
  np.testing.assert_allclose(readers.read_pts(str(tmp_path / "c.pts"), 98), pts, atol=1e-4)


def test_pts_67_points_names_file(tmp_path):
  p = tmp_path / "short.pts"
  p.write_text(_pts_text(np.ones((67, 2))))
  with pytest.raises(readers.DataError, match="short.pts.*67 points.*68"):
    readers.read_pts(str(p), 68)


def test_pts_nan_names_file(tmp_path):
  pts = np.ones((68, 2))
  pts[5, 1] = np.nan
  p = tmp_path / "nan.pts"
  p.write_text(_pts_text(pts))
  with pytest.raises(readers.DataError, match=r"nan.pts.*non-finite.*\[5\]"):
    readers.read_pts(str(p), 68)


@pytest.mark.parametrize("text,match", [
    ("version: 1\nn_points: 68\n{\n1 2\n}\n", "bad.pts.*n_points 68"),  # header count
    ("version: 1\nn_points: 2\n{\n1 2\nabc def\n}\n", "bad.pts:5"),     # names the line
])
def test_pts_bad_text_names_file(tmp_path, text, match):
  p = tmp_path / "bad.pts"
  p.write_text(text)
  with pytest.raises(readers.DataError, match=match):
    readers.read_pts(str(p))


def _wflw_line(n_fields=207, value=1.0, image="a/b.jpg"):
  coords = " ".join(f"{value + i:.3f}" for i in range(196))
  if n_fields == 207:
    return coords + " 10 20 300 400 1 0 0 1 0 0 " + image
  return coords + " " + image


def test_wflw_line_full():
  rec = readers.parse_wflw_line(_wflw_line())
  assert rec.landmarks.shape == (98, 2) and rec.landmarks[0, 0] == 1.0
  np.testing.assert_array_equal(rec.box, [10, 20, 300, 400])
  np.testing.assert_array_equal(rec.attributes, [1, 0, 0, 1, 0, 0])
  assert rec.image == "a/b.jpg"


def test_wflw_line_attribute_list_format():
  rec = readers.parse_wflw_line(_wflw_line(197))
  assert rec.box is None and rec.attributes.sum() == 0


def test_wflw_bad_lines(tmp_path):
  p = tmp_path / "list.txt"
  p.write_text(_wflw_line() + "\n" + "1 2 3 x.jpg\n" + _wflw_line(value=np.nan) + "\n")
  with pytest.raises(readers.DataError, match="list.txt:2.*fields"):
    readers.read_wflw_list(str(p))
  log = readers.SkipLog()
  recs = readers.read_wflw_list(str(p), skip_bad=True, skips=log)
  assert len(recs) == 1 and len(log) == 2
  assert any("non-finite" in i["reason"] and i["line"] == 3 for i in log.items)


def test_corrupt_image(tmp_path):
  p = tmp_path / "bad.jpg"
  p.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
  with pytest.raises(readers.DataError, match="bad.jpg.*corrupt image"):
    readers.check_image(str(p))
  with pytest.raises(readers.DataError, match="missing image"):
    readers.check_image(str(tmp_path / "nope.jpg"))


def _face_folder(root, n=3, num_points=68):
  os.makedirs(root, exist_ok=True)
  rng = np.random.default_rng(0)
  for i in range(n):
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        os.path.join(root, f"f{i}.jpg"))
    readers.write_pts(os.path.join(root, f"f{i}.pts"), rng.uniform(5, 58, (num_points, 2)))


def test_pts_folder_scan_errors_and_skips(tmp_path):
  root = str(tmp_path / "faces")
  _face_folder(os.path.join(root, "sub"), 3)
  Image.new("RGB", (8, 8)).save(os.path.join(root, "unannotated.png"))
  scan = sources.scan_pts_folder(root, 68)
  assert len(scan.splits["all"]) == 3
  assert scan.skips.counts() == {"no_annotation": 1}
  assert scan.splits["all"][0].file_id == "sub/f0"
  # A 67-point .pts and a corrupt image: errors naming the file, or counted skips.
  readers.write_pts(os.path.join(root, "sub", "f1.pts"), np.ones((67, 2)))
  with open(os.path.join(root, "sub", "f2.jpg"), "wb") as f:
    f.write(b"garbage")
  with pytest.raises(readers.DataError, match="f1.pts"):
    sources.scan_pts_folder(root, 68)
  scan = sources.scan_pts_folder(root, 68, skip_bad=True)
  assert len(scan.splits["all"]) == 1
  assert scan.skips.counts() == {"no_annotation": 1, "wrong point count": 1,
                                 "corrupt image": 1}


def test_empty_folder_is_an_error(tmp_path):
  with pytest.raises(readers.DataError, match="empty split"):
    sources.scan_pts_folder(str(tmp_path), 68)


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "wflw_sample")),
                    reason="../shared/data/wflw_sample absent (shared real data not mounted)")
def test_wflw_scan_shared_sample():
  scan = sources.scan_wflw(os.path.join(SHARED, "wflw_sample"))
  assert len(scan.splits["train"]) == 1 and len(scan.splits["test"]) == 3
  missing = [s for s in scan.skips.items if s["reason"] == "missing image"]
  assert len(missing) == 3053     # the attribute lists' images are not in the sample
  t = scan.splits["test"][0]
  assert t.landmarks.shape == (98, 2) and t.box.shape == (4,)
