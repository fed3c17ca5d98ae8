"""Analysis results as pandas DataFrames: one row per analysed token.

The columns are the API's row fields (LENS_FORMAT §Result row), in a fixed order: position,
token, token_id, explanation, explanation_tokens, explanation_token_ids, mse, relative_rmse,
token_salience (a list per row), kl and logit_lens_top when asked for, then any field a
newer server adds. `df.attrs` holds the request and the result's `meta`.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

COLUMNS = (
    "position",
    "token",
    "token_id",
    "explanation",
    "explanation_tokens",
    "explanation_token_ids",
    "mse",
    "relative_rmse",
    "token_salience",
    "kl",
    "logit_lens_top",
)


def analysis_frame(result: dict[str, Any], request: dict[str, Any] | None = None) -> pd.DataFrame:
    """Turn an analysis response (`{"meta", "rows"}`) into a DataFrame, one row per token."""
    rows = result.get("rows", [])
    present = {key for row in rows for key in row}
    columns = [c for c in COLUMNS if c in present]
    columns += sorted(present - set(columns))
    frame = pd.DataFrame.from_records(rows, columns=columns)
    frame.attrs["request"] = request or {}
    frame.attrs["meta"] = result.get("meta", {})
    return frame


def many_frame(parts: list[tuple[dict[str, Any], pd.DataFrame]]) -> pd.DataFrame:
    """Stack per-request frames, each row labelled with its `lens_id` and `input` index."""
    labelled = []
    for label, frame in parts:
        labelled.append(frame.assign(**label)[[*label, *frame.columns]])
    if not labelled:
        return pd.DataFrame(columns=["lens_id", "input", *COLUMNS[:2]])
    out = pd.concat(labelled, ignore_index=True)
    out.attrs["meta"] = [frame.attrs.get("meta", {}) for _, frame in parts]
    out.attrs["requests"] = [frame.attrs.get("request", {}) for _, frame in parts]
    return out
