// Package wire holds the protobuf messages that nodes exchange over NATS.
// The generated code is committed; `go generate ./internal/wire` remakes it
// (needs protoc and protoc-gen-go on PATH).
package wire

//go:generate protoc --go_out=. --go_opt=paths=source_relative wire.proto
