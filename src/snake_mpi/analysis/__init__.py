"""Reading results: analytic byte and memory counts (``analytic``, ``expected``,
``memory``), per-run summaries (``summary``), the paper's claims and their verdict rules
(``claims``), scheme comparison (``compare``), figures and the HTML report (``plots``,
``report``) and a long table for analysis scripts (``export``)."""
