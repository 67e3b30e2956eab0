package main

import (
	"errors"
	"fmt"
	"os"
	"runtime/pprof"
)

// profiles writes the profiles a bench run asks for (--cpuprofile,
// --memprofile). Both files are created before the run starts, so a path
// that cannot be written fails the command before it spends any time.
type profiles struct {
	cpu, mem *os.File
}

// startProfiles creates the profile files of cfg and starts the CPU
// profile. Call stop when the run ends, whatever its outcome.
func startProfiles(cfg *benchConfig) (*profiles, error) {
	p := &profiles{}
	var err error
	if cfg.cpuProfile != "" {
		if p.cpu, err = os.Create(cfg.cpuProfile); err != nil {
			return nil, fmt.Errorf("--cpuprofile: %w", err)
		}
	}
	if cfg.memProfile != "" {
		if p.mem, err = os.Create(cfg.memProfile); err != nil {
			p.close()
			return nil, fmt.Errorf("--memprofile: %w", err)
		}
	}
	if p.cpu != nil {
		if err := pprof.StartCPUProfile(p.cpu); err != nil {
			p.close()
			return nil, fmt.Errorf("--cpuprofile: %w", err)
		}
	}
	return p, nil
}

// stop ends the CPU profile, writes the allocation profile and closes
// both files; its error names the profile that could not be written.
func (p *profiles) stop() error {
	var errs []error
	if p.cpu != nil {
		pprof.StopCPUProfile()
		if err := p.cpu.Close(); err != nil {
			errs = append(errs, fmt.Errorf("--cpuprofile: %w", err))
		}
	}
	if p.mem != nil {
		if err := pprof.Lookup("allocs").WriteTo(p.mem, 0); err != nil {
			errs = append(errs, fmt.Errorf("--memprofile: %w", err))
		}
		if err := p.mem.Close(); err != nil {
			errs = append(errs, fmt.Errorf("--memprofile: %w", err))
		}
	}
	return errors.Join(errs...)
}

// close closes the files of a start that failed.
func (p *profiles) close() {
	for _, f := range []*os.File{p.cpu, p.mem} {
		if f != nil {
			_ = f.Close()
		}
	}
}
