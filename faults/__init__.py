"""The fault matrix (`make faults`)."""
