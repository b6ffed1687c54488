module chaperone.dev/tests/servers/readers/go

go 1.25
