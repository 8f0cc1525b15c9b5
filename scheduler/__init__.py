"""Placement by snapshot locality, the node agents, the controller (embedded or on Ray), the
router with live migration, and the placement simulator's policies (`fastvllm.scheduler`)."""
