package leakcheck

// AfterOthers exposes Parallel's leak check, which takes a testing.TB, to
// the package's tests.
var AfterOthers = afterOthers
