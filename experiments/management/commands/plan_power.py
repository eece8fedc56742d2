"""`manage.py plan_power`: how many subjects a comparison needs, by simulation."""

import math

from django.core.management.base import BaseCommand, CommandError

from analysis.power import plan_power
from experiments.power import LIMITS, SAME_ITEM_ONCE


class Command(BaseCommand):
    help = (
        "Simulate a study (subjects and query items as random effects; analysis.power) and "
        "print the subjects needed for 80% and 90% power."
    )

    def add_arguments(self, parser):
        parser.add_argument("--comparison", default="GS", help="the pair type, e.g. GS or S1-S2")
        parser.add_argument(
            "--effect",
            type=float,
            required=True,
            help="expected preference for the first-named kind, e.g. 0.56",
        )
        parser.add_argument("--items", type=int, required=True, help="query items available")
        parser.add_argument(
            "--questions-per-subject",
            type=int,
            required=True,
            help="questions of this comparison each subject answers",
        )
        parser.add_argument("--subject-sd", type=float, default=0.5, help="log-odds spread")
        parser.add_argument("--item-sd", type=float, default=0.5, help="log-odds spread")
        parser.add_argument("--alpha", type=float, default=0.05, help="test level (0.05)")
        parser.add_argument(
            "--sims", type=int, default=1000, help="simulated studies per size (1000)"
        )
        parser.add_argument("--seed", type=int, default=0, help="of the simulation (0)")
        parser.add_argument("--max-subjects", type=int, default=1000)

    def handle(self, *args, **o):
        for name, (low, high) in LIMITS.items():
            option, value = "--" + name.replace("_", "-"), o[name]
            if not math.isfinite(value):
                raise CommandError(f"{option} must be a finite number, not {value}")
            if not low <= value <= (math.inf if high is None else high):
                bounds = f"at least {low}" if high is None else f"between {low} and {high}"
                raise CommandError(f"{option} must be {bounds}, not {value}")
        if o["questions_per_subject"] > o["items"]:
            raise CommandError(
                f"--questions-per-subject {o['questions_per_subject']} is more than --items "
                f"{o['items']}: {SAME_ITEM_ONCE.lower()}"
            )
        grid = range(2, o["max_subjects"] + 1)
        try:
            plan = plan_power(
                o["effect"],
                o["items"],
                o["questions_per_subject"],
                n_subjects_grid=grid,
                sims=o["sims"],
                seed=o["seed"],
                subject_sd=o["subject_sd"],
                item_sd=o["item_sd"],
                alpha=o["alpha"],
            )
        except ValueError as error:
            raise CommandError(str(error)) from None
        self.stdout.write(
            f"{o['comparison']}: preference {100 * plan.effect:.1f}%, {plan.items} items, "
            f"{plan.questions_per_subject} questions per subject, subject sd {plan.subject_sd}, "
            f"item sd {plan.item_sd} (log-odds), alpha {plan.alpha}, {plan.sims} simulations"
        )
        for target, n in plan.needed.items():
            needed = f"{n} subjects" if n else f"more than {o['max_subjects']} subjects"
            self.stdout.write(f"{100 * target:.0f}% power: {needed}")
