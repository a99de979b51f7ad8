"""The project's two flows on Microsoft Agent Framework (Prompt flow retires on 2027-04-20); see workflows.py."""
