"""Where a plan's units run. `scheduler` is the one loop every engine shares (plan checks, journal, resume, progress,
merge); `local` runs units in this process, `ray` on a Ray cluster. They know the probe contract — plan, run,
journal, merge — and no particular probe."""
