"""Training: the loop (engine), EMA, LR schedule, optimizer, checkpoint policy, resume, run records, seeding."""
