"""With real weights: the planted lesion of sample_data lights up. Skipped unless HIMATCH_TEST_MODEL names a model.

    HIMATCH_TEST_MODEL=facebook/dinov3-vitb16-pretrain-lvd1689m python -m pytest tests/test_weights.py
"""

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from himatch_med.run import main

MODEL = os.environ.get("HIMATCH_TEST_MODEL")
SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
pytestmark = [pytest.mark.weights, pytest.mark.skipif(not MODEL, reason="set HIMATCH_TEST_MODEL to a DINOv3/DINOv2")]


def test_sample_lesion_is_the_hottest_region(tmp_path):
    code = main([str(SAMPLE / "query.nii.gz"), "--references", str(SAMPLE / "references"), "--model", MODEL,
                 "--image-size", "224", "--bank-cache", str(tmp_path / "cache"), "-o", str(tmp_path)])
    assert code == 0
    heat = nib.load(tmp_path / "query_anomaly.nii.gz").get_fdata()
    lesion = nib.load(SAMPLE / "query_lesion_mask.nii.gz").get_fdata() > 0
    brain = nib.load(SAMPLE / "query.nii.gz").get_fdata() > 0
    assert heat[lesion].mean() > np.percentile(heat[brain & ~lesion], 95)
