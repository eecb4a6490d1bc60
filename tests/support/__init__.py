"""Code the tests share that is not a fixture: one module per topic; fixtures stay in conftest."""
