package main

import (
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"net/url"
	"os"
	"slices"
	"strings"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
)

// connFlags holds the connection flags every command that connects to NATS
// takes, named as the nats CLI names them: credentials and TLS beside
// --url, for a deployment with authentication.
type connFlags struct {
	user, password string
	token          string
	creds          string
	nkey           string
	tlsCert        string
	tlsKey         string
	tlsCA          string
	tlsFirst       bool
	// fromEnv holds the flags whose value came from their environment
	// variable (connEnv), by flag name: errors name the variable.
	fromEnv map[string]bool
}

// connFlagNames are the flags of connFlags, in the order errors list them.
var connFlagNames = []string{"user", "password", "token", "creds", "nkey", "tlscert", "tlskey", "tlsca", "tlsfirst"}

// connEnv names the environment variable that gives a connection flag its
// default, as the nats CLI names them (--token has none there, nor here).
var connEnv = map[string]string{
	"user": "NATS_USER", "password": "NATS_PASSWORD", "creds": "NATS_CREDS", "nkey": "NATS_NKEY",
	"tlscert": "NATS_CERT", "tlskey": "NATS_KEY", "tlsca": "NATS_CA",
}

// authFlagNames are the flags that say how to authenticate, one way at a
// time; the others (TLS) go with any of them.
var authFlagNames = []string{"user", "password", "token", "creds", "nkey"}

// addConnFlags adds the connection flags to fs, writing into f. only, if
// set, says when they may be used (bench: with --url).
func addConnFlags(fs *flag.FlagSet, f *connFlags, only string) {
	fs.StringVar(&f.user, "user", "", "connect as this NATS `user` (nats.UserInfo), with --password"+only)
	fs.StringVar(&f.password, "password", "", "the --user's `password` (nats.UserInfo); never printed"+only)
	fs.StringVar(&f.token, "token", "", "connect with this authentication `token` (nats.Token); never printed"+only)
	fs.StringVar(&f.creds, "creds", "", "connect with this user credentials `file`, a JWT and an nkey seed as nsc writes it (nats.UserCredentials)"+only)
	fs.StringVar(&f.nkey, "nkey", "", "connect with the user nkey seed in this `file` (nats.NkeyOptionFromSeed)"+only)
	fs.StringVar(&f.tlsCert, "tlscert", "", "the client TLS certificate `file`, PEM, with --tlskey (nats.ClientCert)"+only)
	fs.StringVar(&f.tlsKey, "tlskey", "", "the client TLS private key `file`, PEM, with --tlscert (nats.ClientCert)"+only)
	fs.StringVar(&f.tlsCA, "tlsca", "", "the CA certificate `file`, PEM, that verifies the servers (nats.RootCAs); without it, the system's roots verify them"+only)
	fs.BoolVar(&f.tlsFirst, "tlsfirst", false, "perform the TLS handshake before the server's greeting (nats.TLSHandshakeFirst), for servers configured with handshake_first"+only)
	// The variables are defaults, read after parsing (useEnv): shown
	// here, the flag package would print their values, secrets included.
	for name, env := range connEnv {
		fl := fs.Lookup(name)
		fl.Usage += fmt.Sprintf(" (default: $%s, when no flag of its kind is given)", env)
	}
}

// useEnv fills the connection flags not given on the command line from
// their environment variables (connEnv), as the nats CLI does: a way to
// authenticate only when no authentication flag was given and urls hold no
// credentials (an explicit choice is never mixed with the environment's);
// the client certificate and key only when neither flag was given; the CA
// when --tlsca was not. getenv is os.Getenv outside tests.
func (f *connFlags) useEnv(fs *flag.FlagSet, urls string, getenv func(string) string) {
	set := setOnCommandLine(fs)
	anySet := func(names ...string) bool { return slices.ContainsFunc(names, func(n string) bool { return set[n] }) }
	fill := func(names ...string) {
		for _, name := range names {
			if v := getenv(connEnv[name]); v != "" {
				_ = fs.Set(name, v) // string flags: Set cannot fail
				if f.fromEnv == nil {
					f.fromEnv = map[string]bool{}
				}
				f.fromEnv[name] = true
			}
		}
	}
	if !anySet(authFlagNames...) && !urlHasCredentials(urls) {
		fill("user", "password", "creds", "nkey")
	}
	if !anySet("tlscert", "tlskey") {
		fill("tlscert", "tlskey")
	}
	if !set["tlsca"] {
		fill("tlsca")
	}
}

// label names a connection flag in messages: --name, or $VARIABLE when its
// value came from the environment.
func (f *connFlags) label(name string) string {
	if f.fromEnv[name] {
		return "$" + connEnv[name]
	}
	return "--" + name
}

// setOnCommandLine returns the names of the flags fs parsed from the
// command line (or Set since).
func setOnCommandLine(fs *flag.FlagSet) map[string]bool {
	set := map[string]bool{}
	fs.Visit(func(fl *flag.Flag) { set[fl.Name] = true })
	return set
}

// given returns the connection flags set on the command line, as --name.
func (f *connFlags) given(fs *flag.FlagSet) []string {
	set := setOnCommandLine(fs)
	var names []string
	for _, n := range connFlagNames {
		if set[n] {
			names = append(names, "--"+n)
		}
	}
	return names
}

// check checks the flags against each other and against the credentials
// urls (comma-separated) may hold. No error holds the password or the
// token.
func (f *connFlags) check(urls string) error {
	var kinds []string
	if f.user != "" || f.password != "" {
		kinds = append(kinds, f.label("user")+"/"+f.label("password"))
	}
	for _, k := range []struct{ name, value string }{{"token", f.token}, {"creds", f.creds}, {"nkey", f.nkey}} {
		if k.value != "" {
			kinds = append(kinds, f.label(k.name))
		}
	}
	switch {
	case len(kinds) > 1:
		return fmt.Errorf("%s exclude each other: give one way to authenticate", strings.Join(kinds, " and "))
	case f.password != "" && f.user == "":
		return fmt.Errorf("%s needs %s", f.label("password"), f.label("user"))
	case (f.tlsCert == "") != (f.tlsKey == ""):
		return fmt.Errorf("%s and %s go together: give both", f.label("tlscert"), f.label("tlskey"))
	case len(kinds) == 1 && urlHasCredentials(urls):
		// nats.go would use the URL's and ignore the flag's without a word.
		return fmt.Errorf("%s and credentials in --url exclude each other", kinds[0])
	}
	return nil
}

// options reads every file the flags name, so that a missing or malformed
// one fails now, naming it, rather than at connect time, and returns the
// nats.go options the flags ask for.
func (f *connFlags) options() ([]nats.Option, error) {
	var opts []nats.Option
	if f.user != "" {
		opts = append(opts, nats.UserInfo(f.user, f.password))
	}
	if f.token != "" {
		opts = append(opts, nats.Token(f.token))
	}
	if f.creds != "" {
		if err := checkCreds(f.creds); err != nil {
			return nil, fmt.Errorf("%s %s: %w", f.label("creds"), f.creds, err)
		}
		opts = append(opts, nats.UserCredentials(f.creds))
	}
	if f.nkey != "" {
		// It reads the seed now, and signs with the file's at connect.
		opt, err := nats.NkeyOptionFromSeed(f.nkey)
		if err != nil {
			return nil, fmt.Errorf("%s %s: %w", f.label("nkey"), f.nkey, err)
		}
		opts = append(opts, opt)
	}
	if f.tlsCert != "" {
		// nats.go loads the pair at connect; tell a bad file now.
		if _, err := tls.LoadX509KeyPair(f.tlsCert, f.tlsKey); err != nil {
			return nil, fmt.Errorf("%s %s, %s %s: %w", f.label("tlscert"), f.tlsCert, f.label("tlskey"), f.tlsKey, err)
		}
		opts = append(opts, nats.ClientCert(f.tlsCert, f.tlsKey))
	}
	if f.tlsCA != "" {
		opt := nats.RootCAs(f.tlsCA)
		if err := opt(&nats.Options{}); err != nil { // reads and parses the file
			return nil, fmt.Errorf("%s %s: %w", f.label("tlsca"), f.tlsCA, err)
		}
		opts = append(opts, opt)
	}
	if f.tlsFirst {
		opts = append(opts, nats.TLSHandshakeFirst())
	}
	return opts, nil
}

// describe says how the flags authenticate, for errors: the user's name
// and the files, never a secret. Empty when no flag is set.
func (f *connFlags) describe() string {
	var parts []string
	switch {
	case f.user != "":
		parts = append(parts, fmt.Sprintf("as user %q", f.user))
		if f.fromEnv["user"] {
			parts[0] += " (from $" + connEnv["user"] + ")"
		}
	case f.token != "":
		parts = append(parts, "with --token")
	case f.creds != "":
		parts = append(parts, "with "+f.label("creds")+" "+f.creds)
	case f.nkey != "":
		parts = append(parts, "with "+f.label("nkey")+" "+f.nkey)
	}
	if f.tlsCert != "" {
		parts = append(parts, "with "+f.label("tlscert")+" "+f.tlsCert)
	}
	if f.tlsCA != "" {
		parts = append(parts, "with "+f.label("tlsca")+" "+f.tlsCA)
	}
	if f.tlsFirst {
		parts = append(parts, "TLS handshake first")
	}
	if len(parts) == 0 {
		return ""
	}
	return " (" + strings.Join(parts, ", ") + ")"
}

// checkCreds reads a credentials file as nats.UserCredentials will at
// connect time: a user JWT and a user nkey seed, each between its
// -----BEGIN/END----- lines.
func checkCreds(path string) error {
	contents, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	defer clear(contents) // as nats.go wipes it
	jwt, err := nkeys.ParseDecoratedJWT(contents)
	if err != nil {
		return err
	}
	// ParseDecoratedJWT returns the whole file when it finds no JWT block.
	if strings.Count(jwt, ".") != 2 || strings.ContainsAny(jwt, " \n") {
		return errors.New("no user JWT found (want a credentials file, as nsc writes it)")
	}
	kp, err := nkeys.ParseDecoratedUserNKey(contents)
	if err != nil {
		return fmt.Errorf("no user nkey seed found: %w", err)
	}
	kp.Wipe()
	return nil
}

// urlHasCredentials reports whether one of the comma-separated urls holds
// a user, a password or a token.
func urlHasCredentials(urls string) bool {
	for s := range strings.SplitSeq(urls, ",") {
		if u, err := url.Parse(strings.TrimSpace(s)); err == nil && u.User != nil {
			return true
		}
	}
	return false
}
