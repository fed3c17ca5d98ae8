"""One table of option bounds: lenscore, the HTTP schema and docs/LENS_FORMAT.md agree."""

import re
from pathlib import Path

import pytest

from lenscore import AnalysisOptions, BadInput
from lenscore.options import BOUNDS

DOC = Path(__file__).resolve().parents[2] / "docs" / "LENS_FORMAT.md"


def test_the_docs_show_every_bound_of_the_table():
    text = DOC.read_text()
    section = text.split("## Analysis options", 1)[1].split("\n## ", 1)[0]
    for name, bound in BOUNDS.items():
        pattern = rf"`{name}`[^\n]*`{re.escape(bound.text())}`"
        assert re.search(pattern, section), f"{name}: {bound.text()} not in the docs' table"


@pytest.mark.parametrize(
    ("name", "inside", "outside"),
    [
        ("temperature", 2.0, 2.01),
        ("optimize_temperature", 0.01, 0.0),
        ("best_of_k", 64, 65),
        ("batch_size", 512, 513),
        ("seed", 2**63 - 1, 2**63),
        ("last_n_messages", 1, 0),
    ],
)
def test_lenscore_and_the_http_schema_enforce_the_same_bound(name, inside, outside):
    from pydantic import ValidationError

    from deployments.ingress.schemas import AnalyzeOptions

    AnalysisOptions.from_dict({name: inside})
    AnalyzeOptions.model_validate({name: inside})
    with pytest.raises(BadInput, match=name):
        AnalysisOptions.from_dict({name: outside})
    with pytest.raises(ValidationError):
        AnalyzeOptions.model_validate({name: outside})
