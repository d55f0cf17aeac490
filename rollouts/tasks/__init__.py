"""Tasks and environments: what a policy is asked, and how its answers are rewarded."""
