"""What a step computes: the step plan and the one forward on top of a runner (`forward`), and
the loss terms, one class each (`losses`)."""
