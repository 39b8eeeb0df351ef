"""The teacher wing: where the frozen AR teacher's targets are computed, and how they reach the student's loss.

``targets.py`` (the teacher's shifted log-probs, full or top-k), ``exchange.py`` (a teacher at its own
layout: inputs to it, targets back), ``stream.py`` (the teacher riding the student's pipeline pass) and
``route.py`` (the one table that chooses among them, and the route object the step runs).
"""
