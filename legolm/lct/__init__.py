"""Lagged Cache Training for recurrent-context models (`ContextPythia`)."""
