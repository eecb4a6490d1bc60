"""Whether a sensor has ticked: the proving tools wait for the request sensor's first tick (the
daemon runs and the code location loaded) before they start the clock."""

from __future__ import annotations

from dagster import DagsterInstance
from dagster._core.scheduler.instigation import InstigatorType


def sensor_has_ticked(instance: DagsterInstance, sensor_name: str) -> bool:
    """True once the sensor named ``sensor_name`` has at least one tick on this instance."""
    for state in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR):
        if state.instigator_name == sensor_name and instance.get_ticks(
            state.instigator_origin_id, state.selector_id, limit=1
        ):
            return True
    return False
