package leakcheck

// Track exposes Parallel's labelling and check, which take a testing.TB, to
// the package's tests.
var Track = track
