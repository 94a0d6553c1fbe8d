"""``volcnn evaluate-findings``: inference outputs + annotation CSV -> FROC / CPM, froc.json and froc.png."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from volcnn.cli import main as volcnn_main
from volcnn.evaluation.findings import evaluate_findings, format_table, read_annotations
from volcnn.evaluation.froc import froc
from volcnn.evaluation.froc_plot import plot_froc
from volcnn.evaluation.plots import DPI

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SECRET = "PATIENT-7731"  # a patient column value that must never be printed

# RAS mm. case_000 is nodule-free (its finding is an FP), case_003 is annotated but was never inferred,
# case_004 failed inference (folder without findings.json, listed in failures.json).
NODULES_RAS = {
    "case_001": [([30.5, -12.25, -100.0], 8.0), ([-40.0, 20.0, -80.0], 12.0)],
    "case_002": [([10.0, 10.0, -50.0], 6.0)],
    "case_003": [([0.0, 0.0, 0.0], 10.0)],
}
FINDINGS = {
    "case_000": [([5.0, 5.0, 5.0], 0.7)],
    "case_001": [([31.0, -12.0, -99.0], 0.9), ([-44.0, 21.0, -81.0], 0.4), ([0.0, 0.0, -90.0], 0.8)],
    "case_002": [([10.0, 10.0, -46.0], 0.6)],  # 4 mm away, radius 3: an FP; the nodule is missed
}


def _write_run(root: Path, findings: dict = FINDINGS, operating: dict | None = None) -> Path:
    """A 'volcnn infer' output folder as the runner writes it (``operating``: case -> its operating threshold)."""
    out = root / "infer"
    for case, items in findings.items():
        doc = {
            **({"operating_threshold": operating[case]} if operating and case in operating else {}),
            "case": case,
            "score": max((p for _, p in items), default=0.0),
            "score_method": "max",
            "findings": [{"center_ras_mm": c, "center_voxel": [1, 2, 3], "probability": p} for c, p in items],
            "model": {"name": "m", "version": "1", "sha256": "0" * 64},
            "input_sha256": "1" * 64,
            "stride_mm": 4.0,
            "threshold": 0.3,
        }
        (out / case).mkdir(parents=True)
        (out / case / "findings.json").write_text(json.dumps(doc))
        (out / case / "heatmap.nii.gz").write_bytes(b"")
    (out / "case_004").mkdir()
    (out / "failures.json").write_text(json.dumps([{"input": "/data/case_004.nii.gz", "error": "truncated"}]))
    (out / "summary.csv").write_text("case,score,n_findings,max_probability,status\n")
    return out


def _luna16_csv(path: Path, nodules: dict = NODULES_RAS) -> Path:
    """LUNA16 annotations.csv: LPS, so x and y change sign."""
    rows = ["seriesuid,coordX,coordY,coordZ,diameter_mm"]
    rows += [f"{case},{-x},{-y},{z},{d}" for case, items in nodules.items() for (x, y, z), d in items]
    path.write_text("\n".join(rows) + "\n")
    return path


def _nodules_csv(path: Path, nodules: dict = NODULES_RAS) -> Path:
    """volcnn synthetic nodules.csv: RAS, with a patient column."""
    rows = ["case,patient,split,x_ras,y_ras,z_ras,diameter_mm,texture,malignant,calcified"]
    rows += [
        f"{case},{SECRET},test,{x},{y},{z},{d},solid,0,0" for case, items in nodules.items() for (x, y, z), d in items
    ]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return _write_run(tmp_path)


def _expected() -> dict:
    """The same evaluation straight from the metric: the four inferred cases, case_003 left out."""
    cases = ["case_000", "case_001", "case_002"]
    return froc({c: [(x, p) for x, p in FINDINGS[c]] for c in cases}, NODULES_RAS, cases)


def test_luna16_and_nodules_csv_give_the_same_result(run_dir, tmp_path):
    luna = evaluate_findings(run_dir, _luna16_csv(tmp_path / "annotations.csv"))
    ras = evaluate_findings(run_dir, _nodules_csv(tmp_path / "nodules.csv"))
    assert luna["inputs"]["annotations_coords"] == "lps" and ras["inputs"]["annotations_coords"] == "ras"
    expected = _expected()
    for result in (luna, ras):
        assert {k: result[k] for k in expected} == expected
    # by hand: 3 scans, 3 nodules (case_003 not inferred); TP 0.9 and 0.4 in case_001; FPs 0.8, 0.7, 0.6
    assert (luna["num_scans"], luna["num_nodules"], luna["num_tp"], luna["num_fp"]) == (3, 3, 2, 3)
    assert luna["curve"]["thresholds"] == [0.9, 0.8, 0.7, 0.6, 0.4]
    assert luna["not_inferred"] == ["case_003"] and luna["num_not_inferred"] == 1
    assert luna["num_scans_without_nodules"] == 1 and luna["num_failed_inputs"] == 1
    assert any("case_003" in w for w in luna["warnings"]) and any("failed" in w for w in luna["warnings"])


def test_coordinate_convention_matters_and_can_be_forced(run_dir, tmp_path):
    luna = _luna16_csv(tmp_path / "annotations.csv")
    as_ras = evaluate_findings(run_dir, luna, coords="ras")  # LPS numbers read as RAS: the nodules move away
    assert as_ras["inputs"]["annotations_coords"] == "ras" and as_ras["num_tp"] == 0 and as_ras["cpm"] == 0
    assert evaluate_findings(run_dir, luna, coords="lps")["cpm"] == _expected()["cpm"]
    with pytest.raises(ValueError, match="RAS coordinates; --coords lps contradicts"):
        evaluate_findings(run_dir, _nodules_csv(tmp_path / "nodules.csv"), coords="lps")
    with pytest.raises(ValueError, match="coords must be one of"):
        evaluate_findings(run_dir, luna, coords="xyz")


def test_excluded_csv_ignores_findings_and_accepts_unknown_diameters(run_dir, tmp_path):
    excluded = tmp_path / "annotations_excluded.csv"
    excluded.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\ncase_001,-0.0,-0.0,-88.0,-1\n")
    assert read_annotations(excluded, allow_negative_diameter=True)[0] == {"case_001": [([0.0, 0.0, -88.0], -1.0)]}
    r = evaluate_findings(run_dir, _luna16_csv(tmp_path / "annotations.csv"), excluded=excluded)
    # the 0.8 FP at z=-90 is 2 mm from the excluded mark (10 mm default diameter): ignored
    assert (r["num_fp"], r["num_ignored_excluded"]) == (2, 1)
    assert r["inputs"]["excluded_coords"] == "lps"


def test_case_name_mismatch_is_an_error_not_cpm_0(run_dir, tmp_path):
    renamed = {f"1.3.6.1.4.{i}": v for i, v in enumerate(NODULES_RAS.values())}
    with pytest.raises(ValueError, match="no case in common") as err:
        evaluate_findings(run_dir, _luna16_csv(tmp_path / "annotations.csv", renamed))
    assert "annotations.csv" in str(err.value) and "case_000" in str(err.value) and "1.3.6.1.4.0" in str(err.value)


def test_cases_restrict_the_evaluation(run_dir, tmp_path):
    csv = _luna16_csv(tmp_path / "annotations.csv")
    r = evaluate_findings(run_dir, csv, cases=["case_001", "case_002"])
    assert r["num_scans"] == 2 and r["num_fp"] == 2
    with pytest.raises(ValueError, match=r"no findings.json for 1 requested case\(s\): case_003"):
        evaluate_findings(run_dir, csv, cases=["case_001", "case_003"])
    with pytest.raises(ValueError, match=r"annotations.csv: no nodules in the 1 evaluated scan\(s\)"):
        evaluate_findings(run_dir, csv, cases=["case_000"])


def test_outputs_are_written(run_dir, tmp_path):
    out = tmp_path / "eval"
    r = evaluate_findings(run_dir, _luna16_csv(tmp_path / "annotations.csv"), out_dir=out, bootstrap=20)
    assert json.loads((out / "froc.json").read_text()) == r
    assert r["outputs"] == {"json": str(out / "froc.json"), "png": str(out / "froc.png")}
    assert (out / "froc.png").read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(p.name for p in out.iterdir()) == ["froc.json", "froc.png"]  # no temporary files left
    assert r["bootstrap"]["resamples"] == 20


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        ("bad_json", "findings.json: cannot read findings"),
        ("bad_finding", r"findings.json: finding 0 is malformed \(missing 'probability'\)"),
        ("no_findings", "no <case>/findings.json found"),
        ("nan_finding", r"findings.json: finding 0 is malformed \(non-finite"),
        ("bad_row", r"annotations.csv: 1 bad row\(s\):\n  line 3: diameter_mm 'big' is not a number"),
        ("bad_header", r"annotations.csv: expected coordinate columns"),
    ],
)
def test_unusable_inputs_name_the_file(tmp_path, setup, match):
    run_dir = _write_run(tmp_path)
    csv = _luna16_csv(tmp_path / "annotations.csv")
    if setup == "bad_json":
        (run_dir / "case_001" / "findings.json").write_text("{not json")
    elif setup == "bad_finding":
        (run_dir / "case_002" / "findings.json").write_text(json.dumps({"findings": [{"center_ras_mm": [1, 2, 3]}]}))
    elif setup == "nan_finding":
        doc = {"findings": [{"center_ras_mm": [1, float("nan"), 3], "probability": 0.5}]}
        (run_dir / "case_002" / "findings.json").write_text(json.dumps(doc))
    elif setup == "no_findings":
        for case in FINDINGS:
            (run_dir / case / "findings.json").unlink()
    elif setup == "bad_row":
        csv.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\ncase_001,1,2,3,4\ncase_002,1,2,3,big\n")
    else:
        csv.write_text("seriesuid,x,y,z,diameter_mm\ncase_001,1,2,3,4\n")
    with pytest.raises(ValueError, match=match):
        evaluate_findings(run_dir, csv)


def main(argv: list[str]) -> int:
    """``volcnn evaluate-findings ARGV``'s exit code (argparse's exit on bad usage or --help included)."""
    try:
        return volcnn_main(["evaluate-findings", *argv])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2


def test_cli_prints_the_table_and_writes_next_to_the_findings(run_dir, tmp_path, capsys, caplog):
    csv = _nodules_csv(tmp_path / "nodules.csv")
    with caplog.at_level(logging.INFO):
        code = main([str(run_dir), "--annotations", str(csv)])
    assert code == 0
    out = capsys.readouterr().out
    result = json.loads((run_dir / "froc.json").read_text())
    assert (run_dir / "froc.png").is_file()
    assert out.startswith(format_table(result))
    assert "FPs/scan" in out and "CPM" in out and f"{result['cpm']:.3f}" in out
    for key in ("0.125", "0.25", "0.5", "1", "2", "4", "8"):
        assert f"{key:>8}  {result['sensitivities'][key]:>11.3f}" in out
    assert "case_003" in caplog.text  # the annotated case that was not inferred is reported
    assert SECRET not in out and SECRET not in caplog.text and SECRET not in (run_dir / "froc.json").read_text()


def test_cli_bootstrap_and_out(run_dir, tmp_path, capsys):
    csv = _luna16_csv(tmp_path / "annotations.csv")
    assert main([str(run_dir), "--annotations", str(csv), "--out", str(tmp_path / "o"), "--bootstrap", "30"]) == 0
    assert "95% CI" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "froc.json").read_text())["bootstrap"]["resamples"] == 30
    assert not (run_dir / "froc.json").exists()


def test_cli_exit_codes(run_dir, tmp_path, capsys, caplog):
    csv = _luna16_csv(tmp_path / "annotations.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\ncase_001,1,2,3,-4\n")
    with caplog.at_level(logging.ERROR):
        assert main([str(run_dir), "--annotations", str(bad)]) == 1
    assert "bad.csv" in caplog.text and "line 2: diameter_mm -4 is not positive" in caplog.text
    other = _luna16_csv(tmp_path / "other.csv", {"x": [([0, 0, 0], 5.0)]})
    assert main([str(run_dir), "--annotations", str(other)]) == 1
    assert "no case in common" in caplog.text
    assert main([str(run_dir)]) == 2  # --annotations missing
    assert main([str(run_dir), "--annotations", str(csv), "--coords", "xyz"]) == 2
    assert main([str(tmp_path / "nowhere"), "--annotations", str(csv)]) == 2
    assert main([str(run_dir), "--annotations", str(tmp_path / "none.csv")]) == 2
    assert main([str(run_dir), "--annotations", str(csv), "--bootstrap", "-1"]) == 2
    assert main(["--help"]) == 0
    assert "evaluate-findings" in capsys.readouterr().out
    assert not (run_dir / "froc.json").exists()


def test_plot_froc_png(tmp_path):
    out = plot_froc(
        [0.1, 0.3, 0.3, 1.2, 5.0],
        [0.2, 0.4, 0.6, 0.7, 0.9],
        str(tmp_path / "sub" / "f.png"),
        cpm=0.61,
        operating_points={0.125: 0.25, "8": 0.9, 0.5: float("nan")},
        title="FROC $x",
    )
    assert out == tmp_path / "sub" / "f.png" and out.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(out)
    assert abs(image.shape[1] - 6.0 * DPI) <= 2 and abs(image.shape[0] - 4.8 * DPI) <= 2
    assert image.std() > 0.01
    plot_froc([], [], tmp_path / "empty.png", cpm=float("nan"))  # no findings: a flat curve at 0
    assert (tmp_path / "empty.png").is_file()


def test_plot_froc_rejects_bad_curves(tmp_path):
    with pytest.raises(ValueError, match="points"):
        plot_froc([0.1, 0.2], [0.1], tmp_path / "a.png")
    with pytest.raises(ValueError, match="non-decreasing"):
        plot_froc([0.5, 0.2], [0.1, 0.2], tmp_path / "b.png")
    with pytest.raises(ValueError, match="one-dimensional"):
        plot_froc(np.zeros((2, 2)), np.zeros((2, 2)), tmp_path / "c.png")
    assert not list(tmp_path.iterdir())


def test_per_scan_auc_of_the_volume_score(tmp_path):
    """Scans with nodules (case_001: score 0.9, case_002: 0.6) against the nodule-free case_000 (0.7): AUC 0.5;
    swapping case_000's score below both gives 1.0."""
    csv = _luna16_csv(tmp_path / "annotations.csv")
    result = evaluate_findings(_write_run(tmp_path / "a"), csv)
    scan = result["per_scan"]
    assert (scan["num_with_nodules"], scan["num_without_nodules"]) == (2, 1)
    assert scan["auc"] == pytest.approx(0.5)
    low = {**FINDINGS, "case_000": [([5.0, 5.0, 5.0], 0.2)]}
    assert evaluate_findings(_write_run(tmp_path / "b", low), csv)["per_scan"]["auc"] == pytest.approx(1.0)
    only = {k: v for k, v in FINDINGS.items() if k != "case_000"}
    undefined = evaluate_findings(_write_run(tmp_path / "c", only), csv)["per_scan"]
    assert undefined["auc"] is None and "undefined" in undefined["reason"]
    assert "per scan" in format_table(result)


def test_operating_point_at_the_threshold_the_findings_name(tmp_path, caplog):
    """At 0.65: case_001's 0.9 finding hits its 8 mm nodule; case_000's 0.7 and case_001's 0.8 are false positives;
    the 0.6 and 0.4 findings are below it. 3 nodules in the 3 inferred scans."""
    csv = _luna16_csv(tmp_path / "annotations.csv")
    result = evaluate_findings(_write_run(tmp_path / "a", operating=dict.fromkeys(FINDINGS, 0.65)), csv)
    op = result["operating_point"]
    assert (op["threshold"], op["num_tp"], op["num_fp"]) == (0.65, 1, 2)
    assert op["sensitivity"] == pytest.approx(1 / 3) and op["fps_per_scan"] == pytest.approx(2 / 3)
    assert "operating threshold 0.65: sensitivity 0.333, 0.67 false positives per scan" in format_table(result)
    assert "operating_point" not in evaluate_findings(_write_run(tmp_path / "b"), csv)  # findings name none
    mixed = {"case_000": 0.65, "case_001": 0.65, "case_002": 0.5}
    with caplog.at_level(logging.WARNING):
        result = evaluate_findings(_write_run(tmp_path / "c", operating=mixed), csv)
    assert "operating_point" not in result and any("different operating thresholds" in w for w in result["warnings"])
