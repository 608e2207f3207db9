"""Foundation shared by every component: settings, errors, clock, atomic files."""
