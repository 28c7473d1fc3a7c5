"""The checkpoint service: owns every byte of workflow state, in three tiers."""
