"""The planner: GPU profiles, the memory estimate, placement and routing limits."""
