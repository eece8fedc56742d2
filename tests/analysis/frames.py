"""Answer frames with exactly known shares, in the analysis contract."""

import pandas as pd

from analysis.preference import split_pair_type


def exact_answers(spec, machine=None, study="s"):
    """Rows from {(subject, pair_type, direction): (first_chosen, n)}: the subject chose the first
    kind in exactly `first_chosen` of `n` answers (the first ones). `machine`, if given, is
    {(pair_type, direction): first_chosen_share_as_(k, n)} for a machine 'S' judging the same
    rows in order within each subject's cell."""
    rows = []
    for (subject, pair_type, direction), (k, n) in spec.items():
        first, second = split_pair_type(pair_type)
        for i in range(n):
            row = {
                "study": study,
                "subject": subject,
                "position": len(rows) + 1,
                "direction": direction,
                "pair_type": pair_type,
                "first": first,
                "second": second,
                "chosen": first if i < k else second,
                "response_ms": 1000 + i,
                "item": f"{direction}-{pair_type}-{i}",
            }
            if machine is not None:
                mk, mn = machine[(pair_type, direction)]
                row["machine_S"] = first if i % mn < mk else second
            rows.append(row)
    return pd.DataFrame(rows)
