"""The fault matrix (`make faults`): real processes under real faults, one table row per fault.

Each row starts its own mosquitto, a TCP proxy of its own in front of it (the fault point for
the network), the clinic's subscriber (straight on the broker), `rpm-gateway simulate` (the
devices, in their own process, with a JSON-lines ledger) and the agent (`gateway.cli run`),
then injects its fault and compares the devices' ledger with what the clinic received.

Columns:

* produced: readings the devices put in their memory (ledger "produced"), garbage included.
* delivered: produced readings for a patient that reached the clinic at least once.
* lost: produced readings for a patient that never arrived and are not in_window. Fails the row.
* redelivered_same_id: extra copies under the same reading_id (at-least-once; allowed).
* new_id_or_wrong_patient: one measurement under several ids, or filed under the wrong patient
  (or under a patient at all, for another user slot / the unknown user). Fails the row.
* in_window: confirmed by the device over ATT (ledger "confirmed" at t_c), agent killed at t_k
  (recorded by the harness), missing from outbox and broker, and 0 <= t_k - t_c <= bound, with
  bound = 2 x the injected commit delay (RPM_GATEWAY_FAULT_COMMIT_DELAY_MS; a reading may wait
  for the commit under way, then its own) + 150 ms. Measured on the device side; does not fail.
* violations: other broken promises (published bytes no device produced, a date before 2010 or in
  the future, out of order, an MQTT 3.1.1 fallback, a changed payload published, a healthy file
  moved aside, a wrong exit status, a retry loop...). Fails the row; the notes say which.
* recovery_s: seconds from the end of the fault (restart, broker back, thaw, space back) to the
  first reading delivered after it (the worst trial).

A row whose precondition is missing (no root for tmpfs, no libfaketime) prints SKIP (reason).
"""
